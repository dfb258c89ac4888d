"""Multi-crop: number and sizes of views, and which augmentation each view has with which probability."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from ssl_vit.data.multicrop import (
    MultiCropTransform, NormaliseViews, SeparableGaussianBlur, blur_kernel_size, pil_color_jitter, separable_blur,
)
from ssl_vit.data.transforms import min_crop_side


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


# -- speed switches -------------------------------------------------------------------------------------------
def photo(w: int = 120, h: int = 90, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with noise: blur, resampling and jitter all show on it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([200 * xx + 30, 180 * yy + 40, 120 * (1 - xx) * yy + 60], -1) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size,sigma", [(224, 0.1), (224, 1.3), (224, 2.0), (96, 0.7), (16, 2.0)])
def test_separable_blur_is_v2_gaussian_blur_up_to_rounding(size, sigma):
    x = torch.from_numpy(np.array(photo(size, size, seed=size))).permute(2, 0, 1).contiguous()
    k = blur_kernel_size(size)
    want = v2.functional.gaussian_blur(x, [k, k], [sigma, sigma])
    got = separable_blur(x, k, sigma)
    diff = (got.int() - want.int()).abs()
    assert got.dtype == torch.uint8 and got.shape == x.shape
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # float summation order only


def test_separable_blur_transform_draws_sigma_as_v2_and_keeps_the_input_type():
    pil = photo(40, 40)
    ours, theirs = SeparableGaussianBlur(11, sigma=(0.1, 2.0)), v2.GaussianBlur(11, sigma=(0.1, 2.0))
    torch.manual_seed(5)
    a = ours(pil)
    torch.manual_seed(5)
    b = theirs(pil)
    assert isinstance(a, Image.Image) and a.size == pil.size
    assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1
    tensor = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    assert type(ours(tensor)) is torch.Tensor and ours(tensor).dtype == torch.uint8
    t = MultiCropTransform(32, 16, num_local=2)
    assert all(isinstance(find(view, v2.GaussianBlur), SeparableGaussianBlur) for view in t.views)
    old = MultiCropTransform(32, 16, num_local=2, separable_blur=False)
    assert not any(isinstance(find(view, v2.GaussianBlur), SeparableGaussianBlur) for view in old.views)


def test_torch_resize_gives_the_pil_paths_views_up_to_rounding():
    """Same seed, same draws (the crop parameters depend only on the size): each view of the
    ``torch_resize`` path is the PIL path's view up to the two resampling kernels' rounding."""
    image = photo(120, 90)
    pil, fast = MultiCropTransform(32, 16, num_local=3), MultiCropTransform(32, 16, num_local=3, torch_resize=True)
    std = torch.tensor(fast.std).view(3, 1, 1)
    diffs = []
    for seed in range(40):
        torch.manual_seed(seed)
        a = pil(image)
        torch.manual_seed(seed)
        b = fast(image)
        assert [tuple(v.shape) for v in a] == [tuple(v.shape) for v in b] and all(v.dtype == torch.float32 for v in b)
        diffs += [((x - y) * std * 255).abs().flatten() for x, y in zip(a, b)]  # in uint8 levels
    d = torch.cat(diffs)
    assert d.mean() < 0.5 and torch.quantile(d, 0.99) <= 3.0, (d.mean(), torch.quantile(d, 0.99))


def test_draft_is_asked_only_when_every_crop_keeps_its_resolution():
    t = MultiCropTransform(num_local=10, draft=True)
    assert t.decode_size(500, 375) is None and t.decode_size(375, 500) is None  # ImageNet-sized: never safe
    assert MultiCropTransform(num_local=10).decode_size(4000, 3000) is None  # the switch is off by default
    for w, h in ((2000, 1500), (4000, 3000), (1200, 1600)):
        size = t.decode_size(w, h)
        assert size is not None
        factor = w // size[0]
        assert factor in (2, 4, 8) and h // size[1] == factor
        drafted = (-(-w // factor), -(-h // factor))  # what libjpeg decodes: ceil(W / factor)
        for view in t.views:  # brute force: every crop drawn from the drafted image covers its output
            crop = find(view, v2.RandomResizedCrop)
            for _ in range(300):
                p = crop.make_params([Image.new("RGB", drafted)])
                assert min(p["height"], p["width"]) >= crop.size[0], (w, h, factor, p)
        if factor < 8:  # and the next factor would not have been safe
            assert min_crop_side(w / (2 * factor), h / (2 * factor), t.local_scale) < t.local_size or \
                min_crop_side(w / (2 * factor), h / (2 * factor), t.global_scale) < t.global_size


@pytest.mark.parametrize("num_local,hflip", [(6, 0.5), (0, 0.5), (3, 0.0)])
def test_fused_views_are_the_chains_views_with_the_same_draws(num_local, hflip):
    """``fused_views`` calls each view's draws and kernels directly: under one seed its views are the
    ``torch_resize`` chain's, bit for bit, and it leaves torch's generator where the chain does."""
    image = photo(120, 90)
    kwargs = dict(global_size=48, local_size=24, num_local=num_local, hflip=hflip, torch_resize=True)
    chain, fused = MultiCropTransform(**kwargs), MultiCropTransform(**kwargs, fused_views=True)
    for seed in range(30):
        torch.manual_seed(seed)
        a, after_chain = chain(image), torch.rand(1)
        torch.manual_seed(seed)
        b, after_fused = fused(image), torch.rand(1)
        assert after_chain == after_fused  # same number of draws: the next image's views match too
        assert [tuple(v.shape) for v in a] == [tuple(v.shape) for v in b]
        assert all(v.dtype == torch.float32 and type(v) is torch.Tensor for v in b)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), seed


def test_uint8_views_normalised_where_the_batch_lands_are_the_fused_views():
    """``uint8_views`` stops before the normalisation: ``uint8`` ``[3, s, s]``-contiguous views, the same
    draws; its ``device_augment`` (``NormaliseViews``) on the collated batches gives the float views'
    very values, and keeps nothing in a state dict."""
    kwargs = dict(global_size=40, local_size=16, num_local=4, torch_resize=True, fused_views=True,
                  mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    floats, raw = MultiCropTransform(**kwargs), MultiCropTransform(**kwargs, uint8_views=True)
    normalise = raw.device_augment()
    assert isinstance(normalise, NormaliseViews) and floats.device_augment() is None
    assert dict(normalise.state_dict()) == {}
    batches_f, batches_u = [], []
    for seed in range(8):
        torch.manual_seed(seed)
        a, after_f = floats(photo(90, 70, seed=seed)), torch.rand(1)
        torch.manual_seed(seed)
        b, after_u = raw(photo(90, 70, seed=seed)), torch.rand(1)
        assert after_f == after_u
        assert all(v.dtype == torch.uint8 and v.is_contiguous() for v in b)
        batches_f.append(a)
        batches_u.append(b)
    collated = [torch.stack(views) for views in zip(*batches_u)]
    for got, want in zip(normalise(collated), zip(*batches_f)):
        assert torch.equal(got, torch.stack(want))
    with pytest.raises(ValueError, match="uint8_views=True needs fused_views=True"):
        MultiCropTransform(32, 16, 2, torch_resize=True, uint8_views=True)


def test_fused_views_come_contiguous_for_the_collate():
    """Each fused view is its own ``[3, s, s]``-contiguous float32 tensor (one local buffer, unbound):
    ``torch.stack`` in the collate then copies plain memory (3x slower from channels-last views)."""
    t = MultiCropTransform(global_size=40, local_size=16, num_local=4, torch_resize=True, fused_views=True)
    for seed in range(6):
        torch.manual_seed(seed)
        views = t(photo(90, 70))
        assert all(v.is_contiguous() and v.dtype == torch.float32 for v in views)


def test_pil_color_jitter_is_v2_color_jitter():
    """The direct colour jitter is ``v2.ColorJitter``'s on PIL images pixel for pixel, for the drawn
    order and factors (the contrast's grey level summed in integers), and the identity factors too."""
    jitter = v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    for seed in range(40):
        torch.manual_seed(seed)
        pic = photo(17 + seed, 23, seed=seed)
        params = jitter.make_params([pic])
        if seed % 10 == 0:  # no-op factors and the hue alone
            params.update(brightness_factor=1.0, contrast_factor=None, saturation_factor=1.0)
        assert np.array_equal(np.asarray(pil_color_jitter(pic, params)), np.asarray(jitter.transform(pic, params)))
    flat = Image.new("RGB", (5, 3), (7, 200, 31))  # one colour: the mean is that grey level
    params = dict(fn_idx=torch.tensor([1, 0, 2, 3]), brightness_factor=None, contrast_factor=0.6,
                  saturation_factor=None, hue_factor=None)
    assert np.array_equal(np.asarray(pil_color_jitter(flat, params)), np.asarray(jitter.transform(flat, params)))


def test_fused_views_needs_torch_resize_and_is_refused_by_the_crops_only_path():
    from ssl_vit.data.gpu_augment import MultiCropCrops

    with pytest.raises(ValueError, match="fused_views=True needs torch_resize=True"):
        MultiCropTransform(32, 16, 2, fused_views=True)
    with pytest.raises(ValueError, match="fused_views=True blurs with separable_blur's kernel"):
        MultiCropTransform(32, 16, 2, torch_resize=True, separable_blur=False, fused_views=True)
    with pytest.raises(ValueError, match="MultiCropCrops: fused_views"):
        MultiCropCrops(32, 16, 2, torch_resize=True, fused_views=True)
    with pytest.raises(ValueError, match="MultiCropCrops: its views are always uint8"):
        MultiCropCrops(32, 16, 2, torch_resize=True, uint8_views=True)
    t = MultiCropTransform(32, 16, 2, torch_resize=True, fused_views=True)
    uint8 = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    assert [tuple(v.shape) for v in t(uint8)] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert [tuple(v.shape) for v in t(Image.new("L", (40, 40), 128))][0] == (3, 32, 32)
