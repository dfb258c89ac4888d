"""Image transforms for pretraining and evaluation (torchvision ``transforms.v2``).

Both are callable on a PIL image (or a ``uint8`` ``[C, H, W]`` tensor) and return a plain float32
tensor ``[3, size, size]`` normalised with ``mean``/``std`` (ImageNet statistics by default).

* :class:`PretrainTransform` is the MAE augmentation: ``RandomResizedCrop`` (bicubic) over
  ``scale`` of the area, horizontal flip with probability ``hflip``, normalise.
* :class:`EvalTransform` resizes the shorter side to ``resize`` (bicubic), centre-crops ``size``,
  normalises. ``resize`` defaults to ``floor(size / crop_pct)``: 256 for 224 at the usual
  ``crop_pct=0.875``. For images already at the target size (CIFAR at 32) pass ``crop_pct=1.0``
  (or ``resize=size``): the image is then used as it is.

DINO's multi-crop lives in :mod:`ssl_vit.data.multicrop`; finetuning augmentations come from timm.
"""
import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision.transforms import v2

BICUBIC = v2.InterpolationMode.BICUBIC


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={mean}, std={std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be > 0, got {std}")
    return mean, std


class ToNormalisedTensor:
    """PIL image / ``uint8`` ``[C, H, W]`` tensor -> float32 ``[3, H, W]``, ``(x / 255 - mean) / std``.

    One fused step: the equivalent v2 chain (``ToImage, RGB, ToDtype, Normalize, ToPureTensor``) costs
    about 250 us per 32x32 image against about 110 us here, which matters for small images.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Any) -> Tensor:
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
        x = v2.functional.to_image(image).as_subclass(torch.Tensor)  # [C, H, W]
        if x.dtype != torch.uint8:
            raise TypeError(f"expected a PIL image or a uint8 tensor, got dtype {x.dtype}")
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return x.float().div_(255).sub_(self.mean).div_(self.std)


class _SquareTransform:
    """What both transforms share: ``self.transform`` (a ``v2.Compose``) yields one ``[3, size, size]``
    tensor."""

    size: int
    transform: v2.Compose

    def __call__(self, image: Any) -> Tensor:
        return self.transform(image)

    def output_sizes(self) -> List[Tuple[int, int]]:
        """``[(H, W)]`` of the one tensor this transform returns (read by the start-up checks)."""
        return [(self.size, self.size)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


class PretrainTransform(_SquareTransform):
    """MAE pretraining augmentation: random resized crop (bicubic), horizontal flip, normalise.

    Args:
        size: output side.
        scale: range of the crop area as a fraction of the image area.
        hflip: probability of a horizontal flip.
        mean: per-channel normalisation mean (RGB).
        std: per-channel normalisation std (RGB).

    Returns (``__call__``):
        float32 tensor ``[3, size, size]``.
    """

    def __init__(
        self,
        size: int = 224,
        scale: Sequence[float] = (0.2, 1.0),
        hflip: float = 0.5,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        if size < 1:
            raise ValueError(f"PretrainTransform: size must be >= 1, got {size}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"PretrainTransform: scale must be (min, max) with 0 < min <= max <= 1, got {scale}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"PretrainTransform: hflip is a probability in [0, 1], got {hflip}")
        self.size, self.scale, self.hflip = int(size), (float(scale[0]), float(scale[1])), float(hflip)
        self.mean, self.std = _check_stats(mean, std)
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(self.size, scale=self.scale, interpolation=BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(self.hflip),
                ToNormalisedTensor(self.mean, self.std),
            ]
        )


class EvalTransform(_SquareTransform):
    """Evaluation transform: resize the shorter side (bicubic), centre crop, normalise.

    Args:
        size: output side.
        resize: shorter side before the crop; ``None`` gives ``floor(size / crop_pct)``.
        crop_pct: fraction of the resized image kept by the crop (used when ``resize`` is None);
            0.875 is the ImageNet convention (224 out of 256), 1.0 keeps small images as they are.
        mean: per-channel normalisation mean (RGB).
        std: per-channel normalisation std (RGB).

    Returns (``__call__``):
        float32 tensor ``[3, size, size]``.
    """

    def __init__(
        self,
        size: int = 224,
        resize: Optional[int] = None,
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        if size < 1:
            raise ValueError(f"EvalTransform: size must be >= 1, got {size}")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"EvalTransform: crop_pct must be in (0, 1], got {crop_pct}")
        if resize is None:
            resize = math.floor(size / crop_pct)
        if resize < size:
            raise ValueError(f"EvalTransform: resize ({resize}) must be >= size ({size})")
        self.size, self.resize = int(size), int(resize)
        self.mean, self.std = _check_stats(mean, std)
        self.transform = v2.Compose(
            [
                v2.Resize(self.resize, interpolation=BICUBIC, antialias=True),
                v2.CenterCrop(self.size),
                ToNormalisedTensor(self.mean, self.std),
            ]
        )
