"""PretrainTransform / EvalTransform against plain PIL + numpy computations."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2

from ssl_vit.data import EvalTransform, PretrainTransform
from ssl_vit.data.decode import decode_sample, open_image, to_rgb
from ssl_vit.data.gpu_augment import MultiCropCrops
from ssl_vit.data.transforms import crop_and_flip


def normalise(pixels: np.ndarray, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W], written out by hand."""
    x = pixels.astype(np.float64) / 255.0
    x = (x - np.array(mean)) / np.array(std)
    return torch.from_numpy(x.transpose(2, 0, 1)).float()


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_pretrain_output_and_exact_identity_and_flip():
    pixels = random_image(16, 16)
    image = Image.fromarray(pixels)
    # full-area crop of a square image is the image itself; hflip 0 / 1 are deterministic
    same = PretrainTransform(size=16, scale=(1.0, 1.0), hflip=0.0)(image)
    flipped = PretrainTransform(size=16, scale=(1.0, 1.0), hflip=1.0)(image)
    assert type(same) is torch.Tensor and same.dtype == torch.float32 and same.shape == (3, 16, 16)
    torch.testing.assert_close(same, normalise(pixels), atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped, normalise(pixels[:, ::-1].copy()), atol=1e-5, rtol=0)
    # random crops of a larger, non-square (and greyscale) image: right size, in the normalised range
    out = PretrainTransform(size=8)(Image.fromarray(random_image(30, 20)).convert("L"))
    assert out.shape == (3, 8, 8)
    grey = out * torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None] + torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
    torch.testing.assert_close(grey[0], grey[1], atol=1e-5, rtol=0)  # greyscale replicated to RGB
    torch.testing.assert_close(grey[0], grey[2], atol=1e-5, rtol=0)
    custom = PretrainTransform(size=8, scale=(1, 1), hflip=0, mean=(0.5,) * 3, std=(0.5,) * 3)
    constant = Image.new("RGB", (8, 8), (255, 0, 51))
    expected = torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1])[:, None, None].expand(3, 8, 8)
    torch.testing.assert_close(custom(constant), expected, atol=1e-5, rtol=0)


def test_eval_matches_pil_resize_and_centre_crop():
    pixels = random_image(48, 64, seed=1)
    image = Image.fromarray(pixels)
    transform = EvalTransform(size=16)  # resize = floor(16 / 0.875) = 18 on the shorter side
    assert transform.resize == 18
    resized = np.asarray(image.resize((24, 18), Image.BICUBIC))  # 64x48 -> 24x18
    top, left = (18 - 16) // 2, (24 - 16) // 2
    expected = normalise(resized[top : top + 16, left : left + 16])
    out = transform(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=0)  # PIL vs torchvision bicubic rounding
    small = random_image(32, 32, seed=2)
    torch.testing.assert_close(EvalTransform(32, crop_pct=1.0)(Image.fromarray(small)), normalise(small), atol=1e-5, rtol=0)
    # a uint8 tensor (greyscale here) goes through the same way as the PIL image
    grey = Image.fromarray(small).convert("L")
    as_tensor = torch.from_numpy(np.asarray(grey).copy())[None]  # [1, H, W] uint8
    torch.testing.assert_close(EvalTransform(32, crop_pct=1.0)(as_tensor), EvalTransform(32, crop_pct=1.0)(grey))
    with pytest.raises(TypeError, match="uint8"):
        EvalTransform(32, crop_pct=1.0)(as_tensor.float())
    assert EvalTransform().resize == 256 and EvalTransform(224, resize=224).resize == 224


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        PretrainTransform(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="hflip"):
        PretrainTransform(hflip=2)
    with pytest.raises(ValueError, match="std"):
        EvalTransform(std=(0.1, 0.0, 0.1))
    with pytest.raises(ValueError, match="crop_pct"):
        EvalTransform(crop_pct=0)
    with pytest.raises(ValueError, match="resize"):
        EvalTransform(size=32, resize=16)


# -- speed switches: torch_resize and JPEG draft decoding ---------------------------------------------------
def jpeg(pixels: np.ndarray, exif_orientation: int = 1) -> bytes:
    image, out = Image.fromarray(pixels), io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = exif_orientation
    image.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """A random smooth colour field, a texture of period 7-10 pixels at a random angle and noise: content
    whose statistics show wrong resampling (the texture survives every safe downscale of the crops
    drawn below and vanishes when the decoder downscales too far)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    freq = rng.uniform(2, 12, 3) / max(h, w)
    base = np.stack([128 + 70 * np.sin(freq[c] * xx + rng.uniform(0, 6) + freq[2 - c] * yy) for c in range(3)], -1)
    angle, period = rng.uniform(0, np.pi), rng.uniform(7, 10)
    texture = 45 * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
    return np.clip(base + texture[..., None] + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def test_pretrain_torch_resize_is_the_pil_path_up_to_rounding():
    image = Image.fromarray(photo(90, 120, seed=0))
    pil, fast = PretrainTransform(size=32), PretrainTransform(size=32, torch_resize=True)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    for seed in range(20):
        torch.manual_seed(seed)
        a = pil(image)
        torch.manual_seed(seed)
        b = fast(image)
        levels = ((a - b) * std * 255).abs()
        assert b.shape == (3, 32, 32) and b.dtype == torch.float32 and type(b) is torch.Tensor
        assert levels.mean() < 0.3 and levels.max() <= 12, (seed, levels.mean(), levels.max())
    assert PretrainTransform(size=224, draft=True).decode_size(500, 375) is None
    assert PretrainTransform(size=224, draft=True).decode_size(2000, 1500) == (1000, 750)
    assert PretrainTransform(size=224).decode_size(2000, 1500) is None  # off by default


def test_open_image_drafts_jpegs_by_their_upright_size():
    seen = []

    def hook(w, h):
        seen.append((w, h))
        return w // 2, h // 2

    data = jpeg(photo(300, 400, seed=1), exif_orientation=6)  # stored 400x300, upright 300x400
    image = open_image(data, hook)
    assert seen == [(300, 400)] and image.size == (200, 150)  # stored orientation, halved
    assert to_rgb(image).size == (150, 200)
    assert open_image(data).size == (400, 300)  # no hook: full size
    png = io.BytesIO()
    Image.fromarray(photo(40, 40, seed=2)).save(png, "PNG")
    assert open_image(png.getvalue(), hook).size == (40, 40) and len(seen) == 1  # only JPEGs are drafted
    sample = {"jpg": data, "cls": b"3"}
    image, label = decode_sample(sample, 10, hook)
    assert image.size == (150, 200) and label == 3


def view_stats(views: torch.Tensor) -> torch.Tensor:
    """``[N, 3, s, s]`` uint8 crops -> ``[N, 8]``: channel means and stds, colourfulness and roughness
    (mean |horizontal neighbour difference|, which resampling changes), in [0, 1] units."""
    x = views.float() / 255
    colour = (x.amax(1) - x.amin(1)).mean((1, 2))
    rough = (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))
    return torch.cat([x.mean((2, 3)), x.std((2, 3)), colour[:, None], rough[:, None]], 1)


def test_draft_decoding_keeps_the_output_distribution():
    """The crops (what drafting touches; the colour operations follow unchanged), paired by image
    (200 photographs), independent draws: every statistic of every view agrees within 4.5 standard
    errors plus one uint8 level between full and drafted decoding; and the comparison has the power
    to see a real loss of resolution (forcing a 4x draft, which is unsafe here)."""
    t = MultiCropCrops(32, 16, num_local=2, draft=True)
    assert t.decode_size(256, 192) == (128, 96)
    data = [jpeg(photo(192, 256, seed=s)) for s in range(200)]
    torch.manual_seed(0)

    def stats(decode_size):
        views = [t(to_rgb(open_image(d, decode_size))) for d in data]
        return [view_stats(torch.stack(v)) for v in zip(*views)]

    def bad(a, b):
        d = torch.cat([x - y for x, y in zip(a, b)])
        return (d.mean(0).abs() > 4.5 * d.std(0) / len(d) ** 0.5 + 1 / 255).nonzero().flatten().tolist()

    full, drafted = stats(None), stats(t.decode_size)
    assert bad(full, drafted) == []
    assert 7 in bad(full, stats(lambda w, h: (w // 4, h // 4)))  # 64x48: the texture is gone (roughness)


@pytest.mark.parametrize("channels_last", [False, True])
def test_crop_and_flip_is_the_v2_crop_and_flip_in_the_layout_asked(channels_last):
    """The direct call of torch's uint8 kernel gives v2's pixels and draws for every box, the box of the
    output's size (v2 returns the crop itself: a whole square image) included; ``[C, H, W]``-contiguous
    views by default (what ``torch.stack`` copies fastest), channels-last ones when asked of a
    channels-last image."""
    def crop(size, scale):
        return v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)

    flip, unresampled = v2.RandomHorizontalFlip(0.5), 0
    for pixels, crops in ((random_image(37, 53, seed=4), (crop(24, (0.05, 1.0)), crop(9, (0.05, 0.4)))),
                          (random_image(37, 37, seed=5), (crop(37, (1.0, 1.0)),))):
        channels_last_image = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
        for x in (channels_last_image, channels_last_image.contiguous()):
            for c in crops:
                for seed in range(12):
                    torch.manual_seed(seed)
                    got, after = crop_and_flip(x, c, flip, channels_last=channels_last), torch.rand(1)
                    torch.manual_seed(seed)
                    want, after_v2 = flip(c(x)), torch.rand(1)
                    assert torch.equal(got, want) and after == after_v2, (tuple(x.stride()), c.size, seed)
                    if got.shape == x.shape:  # the whole square image: not resampled
                        unresampled += 1
                    else:
                        cl = channels_last and x.stride(0) == 1
                        assert got.stride() == ((1, 3 * got.shape[2], 3) if cl else got.contiguous().stride())
    assert unresampled >= 12


def test_pretrain_torch_resize_calls_its_chain_directly_with_the_same_draws():
    """With ``torch_resize`` the crop, flip and normalisation are called without v2's dispatch: the
    very output of the v2 chain on the channels-last tensor, under the same seed."""
    pixels = photo(50, 70, seed=3)
    t = PretrainTransform(size=24, torch_resize=True)
    channels_last = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    for seed in range(10):
        torch.manual_seed(seed)
        got = t(Image.fromarray(pixels))
        torch.manual_seed(seed)
        assert torch.equal(got, t.transform(channels_last)), seed
