"""Multi-crop: number and sizes of views, and which augmentation each view has with which probability."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from ssl_vit.data.multicrop import MultiCropTransform, blur_kernel_size


def probability(view: v2.Compose, kind: type) -> float:
    """Probability that ``view`` applies a transform of type ``kind`` (0 when it has none)."""
    for t in view.transforms:
        if isinstance(t, kind):
            return float(getattr(t, "p", 1.0))
        if isinstance(t, v2.RandomApply) and any(isinstance(inner, kind) for inner in t.transforms):
            return float(t.p)
    return 0.0


def find(view: v2.Compose, kind: type):
    for t in view.transforms:
        if isinstance(t, kind):
            return t
        if isinstance(t, v2.RandomApply):
            for inner in t.transforms:
                if isinstance(inner, kind):
                    return inner
    raise AssertionError(f"{kind.__name__} not in {view}")


def image(h: int = 48, w: int = 40) -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype("uint8"))


def test_number_sizes_and_normalisation_of_views():
    t = MultiCropTransform(global_size=32, local_size=16, num_local=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    views = t(image())
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 and type(v) is torch.Tensor for v in views)
    assert all(v.min() >= -2 - 1e-5 and v.max() <= 2 + 1e-5 for v in views)  # (x - 0.5) / 0.25 for x in [0, 1]
    assert len(MultiCropTransform(32, 16, num_local=0)(image())) == 2
    uint8 = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    assert [tuple(v.shape) for v in t(uint8)][-1] == (3, 16, 16)
    grey = Image.new("L", (40, 40), 128)
    assert t(grey)[0].shape == (3, 32, 32)


def test_each_view_has_the_papers_augmentations():
    t = MultiCropTransform(global_size=224, local_size=96, num_local=10)
    assert len(t.views) == 12
    blur = [probability(v, v2.GaussianBlur) for v in t.views]
    solarize = [probability(v, v2.RandomSolarize) for v in t.views]
    assert blur == [1.0, 0.1] + [0.5] * 10
    assert solarize == [0.0, 0.2] + [0.0] * 10
    for i, view in enumerate(t.views):
        assert probability(view, v2.RandomHorizontalFlip) == 0.5
        assert probability(view, v2.ColorJitter) == 0.8
        assert probability(view, v2.RandomGrayscale) == 0.2
        jitter = find(view, v2.ColorJitter)
        assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
        crop = find(view, v2.RandomResizedCrop)
        assert crop.interpolation == v2.InterpolationMode.BICUBIC
        size, scale = (224, (0.4, 1.0)) if i < 2 else (96, (0.05, 0.4))
        assert tuple(crop.size) == (size, size) and tuple(crop.scale) == scale
        gauss = find(view, v2.GaussianBlur)
        assert tuple(gauss.kernel_size) == (blur_kernel_size(size),) * 2 and tuple(gauss.sigma) == (0.1, 2.0)
    assert find(t.views[1], v2.RandomSolarize).threshold == 128


def test_blur_kernel_scales_with_crop_size():
    assert [blur_kernel_size(s) for s in (224, 96, 32, 16, 4)] == [23, 11, 5, 3, 3]
    assert all(blur_kernel_size(s) % 2 == 1 for s in range(1, 300))


def test_solarisation_really_happens_on_view_two_only():
    """A white image stays >= 153 under the jitter (brightness >= 0.6), so it is bright unless
    solarised (255 - x <= 102): view 2 is dark about 20% of the time, the others never."""
    t = MultiCropTransform(global_size=16, local_size=8, num_local=1)
    white = Image.new("RGB", (24, 24), (255, 255, 255))
    torch.manual_seed(0)
    dark = [[v.mean().item() < 0.0 for v in t(white)] for _ in range(300)]
    rates = np.mean(dark, axis=0)
    assert rates[0] == 0 and rates[2] == 0
    assert 0.12 < rates[1] < 0.28


def test_bad_arguments_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match="global_scale"):
        MultiCropTransform(global_scale=(0.5, 0.4))
    with pytest.raises(ValueError, match="num_local"):
        MultiCropTransform(num_local=-1)
    with pytest.raises(ValueError, match="uint8"):
        MultiCropTransform(32, 16, 1)(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="PIL"):
        MultiCropTransform(32, 16, 1)(np.zeros((32, 32, 3), dtype=np.uint8))
