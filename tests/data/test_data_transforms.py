"""PretrainTransform / EvalTransform against plain PIL + numpy computations."""
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ssl_vit.data import EvalTransform, PretrainTransform


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
