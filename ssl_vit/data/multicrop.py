"""DINO's multi-crop augmentation (Caron et al. 2021, Appendix / reference ``DataAugmentationDINO``).

One image becomes ``2 + num_local`` views: two global crops then ``num_local`` local crops. Every view
has a random resized crop (bicubic), horizontal flip (p ``hflip``, 0.5 as the reference), colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8
and grayscale with p 0.2 (the BYOL recipe), then::

    view                     Gaussian blur p    solarize p
    global 1                       1.0              0
    global 2                       0.1              0.2
    each local                     0.5              0

Blur sigma is drawn in ``blur_sigma`` (0.1-2.0 pixels). The reference blurs with PIL (no kernel size);
torchvision needs one, and the usual choice (BYOL, lightly) is 23 at 224, about 10% of the crop. We
scale it with the crop: ``kernel = 2 * round(0.05 * size) + 1`` (odd, at least 3), which gives 23 at
224, 11 at 96, 5 at 32 and 3 at 16.

The blur is :class:`SeparableGaussianBlur`: ``v2.GaussianBlur``'s kernel, padding, sigma draw and
rounding, computed as two 1-D passes (2k multiply-adds a pixel, not k^2; about 10x faster at 224,
where ``v2.GaussianBlur`` cost more than the rest of the view). Only float summation order differs:
about 5e-5 of the output values move by one level.

The per-view pipelines are ``MultiCropTransform.views`` (torchvision ``v2.Compose``), so which
augmentation a view has, with which probability, can be read off the object.

Speed switches (off by default, see :mod:`ssl_vit.data.transforms` and docs/benchmarks.md):
``torch_resize`` crops on a channels-last ``uint8`` tensor with torch's resampling, then hands PIL
the crop for the colour operations; ``draft`` lets the JPEG decoder downscale where every crop
stays at full resolution (:meth:`MultiCropTransform.decode_size`); ``jpeg_decoder="torchvision"``
(with ``torch_resize``) has the data modules decode JPEGs straight into the uint8 tensor it crops;
``fused_views`` (with ``torch_resize``) runs each view's steps by calling their random draws and
kernels directly (the same draws, in the same order, and the same PIL colour kernels), keeps each view
channels-last from the crop to PIL, turns it into float32 once and normalises the local views in one
pass (:meth:`MultiCropTransform._fused_views`); its views are the chain's, bit for bit.
``uint8_views`` (with ``fused_views``) returns the views before normalisation, as ``uint8``
``[3, s, s]`` (a quarter of the bytes to collate, share between processes, pin and copy), and
:meth:`MultiCropTransform.device_augment` gives the module that normalises them where the batch lands
(:class:`NormaliseViews`: the same operations, so the same floats).
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.transforms import v2

from ssl_vit.data.transforms import (
    CROP_RATIO, check_jpeg_decoder, crop_and_flip, draft_size, to_channels_last_uint8,
)

BICUBIC = v2.InterpolationMode.BICUBIC


def blur_kernel_size(crop_size: int) -> int:
    """Odd Gaussian kernel about 10% of the crop: 23 at 224, 11 at 96, 5 at 32, 3 at 16."""
    return max(3, 2 * int(0.05 * crop_size + 0.5) + 1)


# Taps below this fraction of the centre tap are left out of the sums (|offset| > 6.44 sigma): each
# such tap moves an output by under 255e-9 of a level, far below float32's own summation error.
NEGLIGIBLE_TAP = 1e-9


def separable_blur(x: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """``v2.functional.gaussian_blur`` of a ``uint8`` ``[C, H, W]`` image in two 1-D passes: the same
    normalised Gaussian taps and reflect padding, each pass a sum of shifted slices (no im2col), then
    rounded to ``uint8``. Taps under ``NEGLIGIBLE_TAP`` of the centre one are skipped: at 224 (23 taps)
    a sigma of 1 needs 13, 0.5 needs 7."""
    return separable_blur_float(x.float(), kernel_size, sigma).to(torch.uint8)


def separable_blur_float(x: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """:func:`separable_blur` of integer-valued float32 ``[C, H, W]`` pixels in [0, 255], rounded and
    clamped but kept float (the values ``separable_blur`` turns into ``uint8``)."""
    radius = kernel_size // 2
    taps = torch.linspace(-radius, radius, kernel_size).div_(sigma).pow_(2).mul_(-0.5).exp_()
    taps = (taps / taps.sum()).tolist()
    skip = sum(1 for t in taps[:radius] if t < NEGLIGIBLE_TAP * taps[radius])  # from each end
    radius, kernel_size, taps = radius - skip, kernel_size - 2 * skip, taps[skip : len(taps) - skip]
    h, w = x.shape[-2:]
    padded = F.pad(x.unsqueeze(0), (radius,) * 4, mode="reflect")[0]  # [C, H + 2r, W + 2r]
    rows = padded[..., 0:w] * taps[0]
    for i in range(1, kernel_size):
        rows.add_(padded[..., i : i + w], alpha=taps[i])
    out = rows[..., 0:h, :] * taps[0]
    for i in range(1, kernel_size):
        out.add_(rows[..., i : i + h, :], alpha=taps[i])
    return out.round_().clamp_(0, 255)


class SeparableGaussianBlur(v2.GaussianBlur):
    """``v2.GaussianBlur`` (same arguments, same sigma draw) through :func:`separable_blur`; PIL images
    come back as PIL images, ``uint8`` tensors as tensors."""

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        sigma = params["sigma"][0]
        if isinstance(inpt, Image.Image):
            out = separable_blur(to_channels_last_uint8(inpt), self.kernel_size[0], sigma)
            return Image.fromarray(out.permute(1, 2, 0).numpy(), "RGB")
        if isinstance(inpt, Tensor) and inpt.dtype == torch.uint8 and inpt.ndim == 3:
            return separable_blur(inpt, self.kernel_size[0], sigma)
        return super().transform(inpt, params)


def pil_color_jitter(image: Image.Image, params: Dict[str, Any]) -> Image.Image:
    """``v2.ColorJitter.transform(image, params)`` for an RGB PIL image, with ``params`` from its
    ``make_params``: the same PIL kernels in the drawn order, called without v2's dispatch. The
    contrast's grey level is ``ImageEnhance.Contrast``'s, the rounded mean of PIL's luma, here summed
    from its histogram in integers (exact; ``ImageStat`` sums it in a Python loop)."""
    factors = (params["brightness_factor"], params["contrast_factor"], params["saturation_factor"],
               params["hue_factor"])
    for fn_id in params["fn_idx"].tolist():
        factor = factors[fn_id]
        if factor is None:
            continue
        if fn_id == 0:
            image = ImageEnhance.Brightness(image).enhance(factor)
        elif fn_id == 1:
            histogram = np.array(image.convert("L").histogram(), dtype=np.int64)
            mean = int(int(histogram @ np.arange(256)) / int(histogram.sum()) + 0.5)
            image = Image.blend(Image.new("RGB", image.size, (mean,) * 3), image, factor)
        elif fn_id == 2:
            image = ImageEnhance.Color(image).enhance(factor)
        else:
            image = v2.functional.adjust_hue(image, factor)
    return image


def normalise_views(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``uint8`` (or integer-valued float) ``[..., 3, H, W]`` -> float32: ``v2.functional.to_dtype(scale=True)``
    then ``normalize``, the same operations in the same order (in place on a float ``x``); ``mean`` and
    ``std`` broadcast over the channels (``[3, 1, 1]``, or ``[1, 3, 1, 1]`` for batches)."""
    return x.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


class NormaliseViews(nn.Module):
    """The device half of ``MultiCropTransform(uint8_views=True)``: a list of ``uint8`` view batches
    ``[B, 3, s, s]`` -> the normalised float32 batches the CPU path would have made (the same
    operations, :func:`normalise_views`). ``mean`` and ``std`` are buffers outside the state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)

    def forward(self, views: Sequence[Tensor]) -> List[Tensor]:
        return [normalise_views(v, self.mean, self.std) for v in views]


def _contiguous(x: Tensor) -> Tensor:
    """``x`` copied ``[C, H, W]``-contiguous (numpy's strided copy: about twice torch's for ``uint8``)."""
    return torch.from_numpy(np.ascontiguousarray(x.numpy()))


def _fused_steps(view: v2.Compose) -> Tuple[Any, ...]:
    """``(crop, flip, jitter, grayscale, blur, solarize or None)`` of a ``torch_resize`` view, the steps
    :meth:`MultiCropTransform._fused_views` calls directly (what follows them is the normalisation)."""
    steps = list(view.transforms)
    kinds = [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ToPILImage, v2.RandomApply, v2.RandomGrayscale,
             v2.RandomApply]
    solarize = steps[6] if isinstance(steps[6], v2.RandomSolarize) else None
    if [type(t) for t in steps[:6]] != kinds or not isinstance(steps[3].transforms[0], v2.ColorJitter):
        raise RuntimeError(f"fused_views: unexpected view steps {view}")
    return steps[0], steps[1], steps[3], steps[4], steps[5], solarize


def _check_scale(name: str, scale: Sequence[float]) -> Tuple[float, float]:
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"MultiCropTransform: {name} must be (min, max) with 0 < min <= max <= 1, got {scale}")
    return float(scale[0]), float(scale[1])


class MultiCropTransform:
    """PIL image (or ``uint8`` ``[C, H, W]`` tensor) -> list of ``2 + num_local`` normalised views.

    Args:
        global_size: side of the two global crops.
        local_size: side of the local crops.
        num_local: number of local crops (0 allowed: two-view training).
        global_scale: area range of the global random resized crops.
        local_scale: area range of the local random resized crops.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        blur_sigma: range of the Gaussian blur sigma, in pixels.
        hflip: probability of a horizontal flip of each view (0: none, for data where a mirror image
            is another class, such as digits).
        separable_blur: blur with :class:`SeparableGaussianBlur` (False: ``v2.GaussianBlur``).
        torch_resize: crop and resize a ``uint8`` tensor with torch's kernel (rounding differs from PIL).
        draft: let the JPEG decoder downscale where that is safe (:meth:`decode_size`).
        jpeg_decoder: ``"pil"`` or ``"torchvision"`` (needs ``torch_resize``; :mod:`ssl_vit.data.transforms`).
        fused_views: run the views without v2's per-transform dispatch (needs ``torch_resize``; the
            views are the v2 chain's, bit for bit).
        uint8_views: return the views as ``uint8``, not yet normalised (needs ``fused_views``); the
            model normalises them on its device with :meth:`device_augment`'s :class:`NormaliseViews`.

    Returns (``__call__``):
        ``[global_1, global_2, local_1, ..., local_N]``: float32 tensors ``[3, global_size,
        global_size]`` then ``[3, local_size, local_size]`` (``uint8`` with ``uint8_views``).
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        num_local: int = 8,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_scale: Sequence[float] = (0.05, 0.4),
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        hflip: float = 0.5,
        separable_blur: bool = True,
        torch_resize: bool = False,
        draft: bool = False,
        jpeg_decoder: str = "pil",
        fused_views: bool = False,
        uint8_views: bool = False,
    ) -> None:
        if global_size < 1 or local_size < 1:
            raise ValueError(
                f"MultiCropTransform: crop sizes must be >= 1, got global {global_size}, local {local_size}"
            )
        if num_local < 0:
            raise ValueError(f"MultiCropTransform: num_local must be >= 0, got {num_local}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"MultiCropTransform: mean and std need 3 values (std > 0), got {mean}, {std}")
        if len(blur_sigma) != 2 or not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"MultiCropTransform: blur_sigma must be (min, max) with 0 < min <= max, got {blur_sigma}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"MultiCropTransform: hflip is a probability in [0, 1], got {hflip}")
        self.global_size, self.local_size, self.num_local = global_size, local_size, num_local
        self.global_scale = global_scale = _check_scale("global_scale", global_scale)
        self.local_scale = local_scale = _check_scale("local_scale", local_scale)
        self.torch_resize, self.draft = bool(torch_resize), bool(draft)
        self.jpeg_decoder = check_jpeg_decoder(type(self).__name__, jpeg_decoder, self.torch_resize)
        if fused_views and not torch_resize:
            raise ValueError(
                f"{type(self).__name__}: fused_views=True needs torch_resize=True (the fused views crop the "
                "channels-last uint8 tensor that torch_resize makes): set torch_resize=True or fused_views=False"
            )
        if fused_views and not separable_blur:
            raise ValueError(
                f"{type(self).__name__}: fused_views=True blurs with separable_blur's kernel, but separable_blur=False "
                "asks for v2.GaussianBlur's: drop one of the two"
            )
        if uint8_views and not fused_views:
            raise ValueError(
                f"{type(self).__name__}: uint8_views=True needs fused_views=True (the fused views stop before the "
                "normalisation; the v2 chain ends with it): set fused_views=True (with torch_resize=True) or "
                "uint8_views=False"
            )
        self.fused_views, self.uint8_views = bool(fused_views), bool(uint8_views)
        blur = SeparableGaussianBlur if separable_blur else v2.GaussianBlur
        # with torch_resize the crop is a tensor: PIL takes it back for the colour operations (PIL's kernels)
        to_pil = [v2.ToPILImage()] if torch_resize else []
        sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        # kept for the device-side half of ssl_vit.data.gpu_augment.MultiCropCrops
        self.mean, self.std, self.blur_sigma = tuple(float(m) for m in mean), tuple(float(v) for v in std), sigma
        normalize = [
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), v2.ToPureTensor()
        ]

        def view(size: int, scale: Tuple[float, float], blur_p: float, solarize_p: float) -> v2.Compose:
            steps: List[Any] = [
                v2.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(p=float(hflip)),
                *to_pil,
                v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([blur(blur_kernel_size(size), sigma=sigma)], p=blur_p),
            ]
            if solarize_p > 0:
                steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))  # on 8-bit values, as PIL
            return v2.Compose(steps + normalize)

        local = view(local_size, local_scale, blur_p=0.5, solarize_p=0.0)
        self.views: List[v2.Compose] = [
            view(global_size, global_scale, blur_p=1.0, solarize_p=0.0),
            view(global_size, global_scale, blur_p=0.1, solarize_p=0.2),
        ] + [local] * num_local
        self._view_steps = [_fused_steps(v) for v in self.views] if self.fused_views else []
        self._mean_std = tuple(torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (self.mean, self.std))

    def __call__(self, image: Any) -> List[Tensor]:
        image = self._checked(image)
        if self.torch_resize:
            image = to_channels_last_uint8(image)  # one copy, shared by every view
        if self.fused_views:
            return self._fused_views(image)
        return [view(image) for view in self.views]

    def _fused_views(self, x: Tensor) -> List[Tensor]:
        """``[view(x) for view in self.views]`` for a channels-last ``uint8`` ``x`` (:meth:`_fused_view`
        each), normalised as the chain does (the local views in one pass), or ``uint8``
        ``[3, s, s]``-contiguous with ``uint8_views``. The views are the chain's, bit for bit."""
        pixels = [self._fused_view(x, *steps) for steps in self._view_steps]
        if self.uint8_views:  # [3, s, s]-contiguous, what torch.stack copies fastest
            return [p.to(torch.uint8) if p.is_floating_point() else _contiguous(p) for p in pixels]
        out = [self._normalise(p.to(torch.float32, memory_format=torch.contiguous_format)) for p in pixels[:2]]
        if len(pixels) > 2:
            local = torch.empty(len(pixels) - 2, 3, self.local_size, self.local_size)
            for buffer, p in zip(local, pixels[2:]):
                buffer.copy_(p)
            out += list(self._normalise(local).unbind(0))
        return out

    def _fused_view(self, x: Tensor, crop: v2.RandomResizedCrop, flip: v2.RandomHorizontalFlip,
                    jitter: v2.RandomApply, gray: v2.RandomGrayscale, blur: v2.RandomApply,
                    solarize: Optional[v2.RandomSolarize]) -> Tensor:
        """One view's steps before the normalisation, each v2 step's ``make_params`` and kernel called
        directly: the same draws from torch's generator in the same order (the ``RandomApply`` /
        ``_RandomApplyTransform`` test ``rand < p`` included) and the same kernels (PIL's for the colour
        jitter and grayscale, :func:`pil_color_jitter`), without the per-transform dispatch and its
        PIL <-> tensor conversions. The view stays channels-last ``uint8`` (PIL's layout) from the crop
        through the colour operations; a blurred view comes back as the integer-valued float32
        ``[3, s, s]`` the blur computes (the values the chain has as ``uint8``)."""
        y = crop_and_flip(x, crop, flip, channels_last=True)  # uint8 [3, s, s], channels-last
        # PIL's kernels, as the chain (which hands PIL every view; here only the views they change)
        image: Optional[Image.Image] = None
        if torch.rand(1).item() < jitter.p:
            image = Image.fromarray(y.permute(1, 2, 0).contiguous().numpy())
            image = pil_color_jitter(image, jitter.transforms[0].make_params([image]))
        if torch.rand(1).item() < gray.p:  # v2.RandomGrayscale on RGB: PIL's luma on all three channels
            image = image if image is not None else Image.fromarray(y.permute(1, 2, 0).contiguous().numpy())
            y = torch.from_numpy(np.array(image.convert("L"))).expand(3, -1, -1)
        elif image is not None:
            y = to_channels_last_uint8(image)
        if torch.rand(1).item() < blur.p:
            gauss = blur.transforms[0]
            sigma = gauss.make_params([y])["sigma"][0]
            y = separable_blur_float(y.to(torch.float32, memory_format=torch.contiguous_format),
                                     gauss.kernel_size[0], sigma)
        if solarize is not None and torch.rand(1).item() < solarize.p:
            y = torch.where(y >= solarize.threshold, 255 - y, y)  # v2.functional.solarize, on either dtype
        return y

    def _normalise(self, x: Tensor) -> Tensor:
        """``uint8`` (or integer-valued float) ``[..., 3, H, W]`` -> float32 (:func:`normalise_views`)."""
        return normalise_views(x, *self._mean_std)

    def device_augment(self, seed: Optional[int] = None, compile: bool = False) -> Optional[NormaliseViews]:
        """What the model runs on the views where the batch lands (``seed`` and ``compile`` are for the
        crops-only path's augmentation): with ``uint8_views``, their normalisation; else nothing."""
        return NormaliseViews(self.mean, self.std) if self.uint8_views else None

    def _checked(self, image: Any) -> Any:
        """``image`` as an RGB PIL image or a ``uint8`` ``[3, H, W]`` tensor, or a clear error."""
        if isinstance(image, Image.Image):
            return image if image.mode == "RGB" else image.convert("RGB")
        if isinstance(image, Tensor):
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(
                    "MultiCropTransform takes PIL images or uint8 [3, H, W] tensors, got a "
                    f"{image.dtype} tensor of shape {tuple(image.shape)}"
                )
            return image
        raise TypeError(f"MultiCropTransform takes PIL images or uint8 tensors, got {type(image).__name__}")

    def crop_specs(self) -> List[Tuple[int, Tuple[float, float], Tuple[float, float]]]:
        """``(output side, area scale, aspect ratio)`` of the crops drawn from each image."""
        specs = [(self.global_size, self.global_scale, CROP_RATIO)]
        return specs + ([(self.local_size, self.local_scale, CROP_RATIO)] if self.num_local else [])

    def decode_size(self, width: int, height: int) -> Optional[Tuple[int, int]]:
        """With ``draft``: the size to decode a ``width`` x ``height`` JPEG at, so that every crop keeps its
        resolution (:func:`ssl_vit.data.transforms.draft_size`); None without ``draft`` or when unsafe."""
        return draft_size(width, height, self.crop_specs()) if self.draft else None

    def output_sizes(self) -> List[Tuple[int, int]]:
        """``(H, W)`` of every view, in the order ``__call__`` returns them (read by the start-up checks)."""
        return [(self.global_size, self.global_size)] * 2 + [(self.local_size, self.local_size)] * self.num_local

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global_size={self.global_size}, local_size={self.local_size}, "
            f"num_local={self.num_local})"
        )
