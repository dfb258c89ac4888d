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

**Speed switches** (off by default: each changes the output by rounding, see docs/fidelity.md and
docs/benchmarks.md for what each measured):

* ``torch_resize``: the random resized crop runs on a ``uint8`` tensor (a channels-last view of the
  decoded pixels, no copy) with torch's antialiased bicubic kernel (the AVX2 port of Pillow-SIMD's
  resampling), not with PIL's. Same filter; 6% of output values differ from PIL's by one level.
* ``draft``: :meth:`decode_size` asks the JPEG decoder for a DCT-domain downscale by 2, 4 or 8
  (``PIL.Image.draft``) when every crop the transform can draw from the smaller image still has at
  least the output's resolution (:func:`draft_size`); ``ssl_vit.data.decode.decode_image`` applies it.
* ``jpeg_decoder="torchvision"`` (default ``"pil"``): the data modules decode JPEGs with
  ``torchvision.io.decode_jpeg`` into the ``uint8`` tensor the ``torch_resize`` path crops, skipping
  PIL's image and its copy to a tensor (``ssl_vit.data.decode.decode_image``; the same libjpeg-turbo
  pixels). It needs ``torch_resize``: without it the transform works on PIL images
  (:func:`check_jpeg_decoder`). A draft, when ``draft`` asks for one, is PIL's and wins.
"""
import math
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision.transforms import v2

from ssl_vit.data.decode import JPEG_DECODERS

BICUBIC = v2.InterpolationMode.BICUBIC
CROP_RATIO = (3 / 4, 4 / 3)  # v2.RandomResizedCrop's default aspect-ratio range, as the references use
DRAFT_FACTORS = (8, 4, 2)  # the DCT-domain scalings libjpeg offers (PIL.Image.draft)
CropSpec = Tuple[int, Tuple[float, float], Tuple[float, float]]  # (output side, area scale, aspect ratio)


def min_crop_side(width: float, height: float, scale: Sequence[float], ratio: Sequence[float] = CROP_RATIO) -> float:
    """A lower bound of the shorter side of every crop ``v2.RandomResizedCrop(scale=scale, ratio=ratio)``
    can draw from a ``width`` x ``height`` image: a drawn crop has area >= ``scale[0] * W * H`` and
    aspect ratio in ``ratio`` (sides rounded to pixels, hence the -0.5); the fallback central crop
    has a side of at least ``min(W, H)``."""
    drawn = math.sqrt(scale[0] * width * height) * min(math.sqrt(ratio[0]), 1 / math.sqrt(ratio[1])) - 0.5
    return min(drawn, min(width, height) - 0.5)


def draft_size(width: int, height: int, crops: Sequence[CropSpec]) -> Optional[Tuple[int, int]]:
    """The size to ask ``PIL.Image.draft`` for, so that the decoder downscales by the largest factor
    (8, 4 or 2) after which every crop of ``crops`` still covers at least its output side in decoded
    pixels (no output pixel then loses resolution: each crop is still downscaled, never upscaled).
    ``None``: no factor is safe; decode at full size.

    Args:
        width, height: the upright image size (EXIF orientation applied).
        crops: ``(output side, area scale, aspect ratio)`` of every crop drawn from the image.
    """
    for factor in DRAFT_FACTORS:
        w, h = width / factor, height / factor  # the decoded size is ceil(W / factor) >= this
        if all(min_crop_side(w, h, scale, ratio) >= size for size, scale, ratio in crops):
            return width // factor, height // factor
    return None


def to_channels_last_uint8(image: Any) -> Any:
    """A PIL image -> ``uint8`` ``[3, H, W]`` tensor with channels-last strides over one copy of the
    pixels (torch's antialiased uint8 resize is about 4x faster on that layout than on contiguous
    ``[C, H, W]``); anything else is returned unchanged."""
    if not isinstance(image, Image.Image):
        return image
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # [3, H, W], strides (1, 3W, 3)


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={mean}, std={std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be > 0, got {std}")
    return mean, std


def check_jpeg_decoder(owner: str, jpeg_decoder: str, torch_resize: bool) -> str:
    """``jpeg_decoder`` if ``owner`` (a transform's name) can take what it decodes, else a ValueError.

    ``"torchvision"`` decodes into a ``uint8`` tensor, which only the ``torch_resize`` path crops; the
    other path would have to turn it back into a PIL image, a copy that costs what the decoder saves
    (and v2's tensor kernels would change the crops' rounding), so that combination is refused.
    """
    if jpeg_decoder not in JPEG_DECODERS:
        known = ", ".join(map(repr, JPEG_DECODERS))
        raise ValueError(f"{owner}: jpeg_decoder must be one of {known}, got {jpeg_decoder!r}")
    if jpeg_decoder == "torchvision" and not torch_resize:
        raise ValueError(
            f"{owner}: jpeg_decoder='torchvision' needs torch_resize=True (torchvision decodes into a uint8 tensor, "
            "which only the torch_resize path crops; without it the crops run on PIL images): set torch_resize=True "
            "or jpeg_decoder='pil'"
        )
    return jpeg_decoder


def crop_and_flip(x: Tensor, crop: v2.RandomResizedCrop, flip: v2.RandomHorizontalFlip,
                  channels_last: bool = False) -> Tensor:
    """``flip(crop(x))`` for a ``uint8`` ``[3, H, W]`` tensor, calling the two transforms' parameters and
    kernel directly: the same random draws (``make_params``, then the flip's ``rand < p``) and pixels
    as the v2 chain, without its per-call dispatch (a third of the time of a 12-crop image).

    ``channels_last``: for a channels-last ``x`` (:func:`to_channels_last_uint8`), return the view
    channels-last too (strides ``(1, 3 s, 3)``), the layout PIL takes without a copy; torch's uint8
    kernel writes it directly, faster than its ``[C, H, W]`` output (the same pixels). Otherwise the
    view is ``[C, H, W]``-contiguous, the layout ``torch.stack`` copies fastest."""
    box = crop.make_params([x])
    top, left, height, width = box["top"], box["left"], box["height"], box["width"]
    if x.dtype == torch.uint8 and x.device.type == "cpu" and crop.interpolation == BICUBIC:
        y = _resized_crop_uint8(x, top, left, height, width, tuple(crop.size), channels_last and x.stride(0) == 1)
    else:
        y = v2.functional.resized_crop(x, top, left, height, width, list(crop.size),
                                       interpolation=crop.interpolation, antialias=True)
    return y.flip(-1) if torch.rand(1) < flip.p else y


def _resized_crop_uint8(x: Tensor, top: int, left: int, height: int, width: int, size: Tuple[int, int],
                        channels_last: bool) -> Tensor:
    """``v2.functional.resized_crop(..., BICUBIC, antialias=True)`` of a box inside a ``uint8`` ``x`` on the
    CPU, where v2 calls torch's native uint8 kernel, called here directly (v2's wrapper costs about a
    third of a 96-pixel crop). ``channels_last``: the output too, by giving the box the batch stride
    torch needs to read it as channels-last (v2 restrides only whole images that way)."""
    y = x[:, top : top + height, left : left + width]
    if (height, width) == size:
        return y  # v2 returns the crop as it is
    batch = y.unsqueeze(0)
    if channels_last:
        batch = batch.as_strided(batch.shape, (batch.stride(2) * height,) + batch.stride()[1:])
    return torch.nn.functional.interpolate(batch, size=list(size), mode="bicubic", align_corners=False,
                                           antialias=True)[0]


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
    torch_resize: bool = False

    def __call__(self, image: Any) -> Tensor:
        if not self.torch_resize:
            return self.transform(image)
        crop, flip, normalise = self.transform.transforms  # PretrainTransform's chain, called directly
        return normalise(crop_and_flip(to_channels_last_uint8(image), crop, flip))

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
        torch_resize: crop and resize with torch's uint8 kernel (see the module docstring).
        draft: let the JPEG decoder downscale where that is safe (:meth:`decode_size`).
        jpeg_decoder: ``"pil"`` or ``"torchvision"`` (needs ``torch_resize``; see the module docstring).

    Returns (``__call__``):
        float32 tensor ``[3, size, size]``.

    Raises:
        ValueError: an argument out of range, or ``jpeg_decoder="torchvision"`` without ``torch_resize``.
    """

    def __init__(
        self,
        size: int = 224,
        scale: Sequence[float] = (0.2, 1.0),
        hflip: float = 0.5,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        torch_resize: bool = False,
        draft: bool = False,
        jpeg_decoder: str = "pil",
    ) -> None:
        if size < 1:
            raise ValueError(f"PretrainTransform: size must be >= 1, got {size}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"PretrainTransform: scale must be (min, max) with 0 < min <= max <= 1, got {scale}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"PretrainTransform: hflip is a probability in [0, 1], got {hflip}")
        self.size, self.scale, self.hflip = int(size), (float(scale[0]), float(scale[1])), float(hflip)
        self.mean, self.std = _check_stats(mean, std)
        self.torch_resize, self.draft = bool(torch_resize), bool(draft)
        self.jpeg_decoder = check_jpeg_decoder("PretrainTransform", jpeg_decoder, self.torch_resize)
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(self.size, scale=self.scale, interpolation=BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(self.hflip),
                ToNormalisedTensor(self.mean, self.std),
            ]
        )

    def decode_size(self, width: int, height: int) -> Optional[Tuple[int, int]]:
        """With ``draft``: the size to decode a ``width`` x ``height`` JPEG at (:func:`draft_size`), else None."""
        return draft_size(width, height, [(self.size, self.scale, CROP_RATIO)]) if self.draft else None


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
