"""DINO's multi-crop augmentation split in two: crops on the CPU, colour and blur batched on the device.

:class:`~ssl_vit.data.multicrop.MultiCropTransform` does everything per image on the CPU: 12 crops,
each with colour jitter, grayscale, blur and solarisation. Only the random resized crop needs the
full-resolution image, so here the loader does just that part and the rest runs batched where the
batch lands:

* :class:`MultiCropCrops` (data loader, per image): random resized crop (bicubic) and flip, with the
  very ``v2.RandomResizedCrop`` / ``v2.RandomHorizontalFlip`` objects of ``MultiCropTransform``
  (same crop distribution), returning ``uint8`` ``[3, s, s]`` views (a quarter of the float bytes to
  pin and copy).
* :class:`MultiCropGPUAugment` (device, per batch): on each ``uint8`` view batch ``[B, 3, s, s]``,
  colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8 in a per-sample random order of its four operations
  (as ``v2.ColorJitter``), grayscale p 0.2, Gaussian blur (kernel ``blur_kernel_size(s)``, per-sample
  sigma) with p 1.0 / 0.1 / 0.5 (global 1 / global 2 / locals), solarisation p 0.2 on global 2, then
  normalisation to float. Every parameter is drawn per sample as a tensor on the batch's device, and
  the ops are whole-batch tensor ops: no host synchronisation and no Python loop over samples.

Quantisation follows torchvision v2 on ``uint8`` tensors: pixels are kept as integer-valued float32
and each op ends as its uint8 kernel does (jitter and grayscale clamp to [0, 255] and truncate, hue
truncates ``x * 255.999``, blur rounds), so each op equals the ``v2.functional`` op on the same
sample up to float rounding. The CPU path in training runs on PIL images, whose kernels quantise
slightly differently (PIL's hue works in 8-bit HSV); the tests bound that difference statistically.

Cost: views of one size run as one batch (two calls for 2 + 10 crops). Eager, the ops issue ~640
kernels and move ~50 GB per batch of 128 at 2 x 224 + 10 x 96 (~20 ms of H100 memory time);
``compile=True`` fuses them into a few kernels per op group: use it on GPUs. On CUDA, cuDNN may run
the blur in TF32 (``torch.backends.cudnn.allow_tf32``, on by default), so a blurred pixel may round
one level away from the CPU result; the distribution is unchanged.

Integration (DINO; :mod:`ssl_vit.data.device_augment` has the two functions)::

    def setup(self, stage):                       # the transform says whether the device augments
        transform = getattr(self.trainer.datamodule, "train_transform", None)
        self.augment = device_augment_for(transform, compile=self.hparams.compile_augment)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self._trainer is not None and self.trainer.training:
            batch = augment_batch(batch, self.augment)
        return batch
"""
import functools
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.transforms import v2

from ssl_vit.data.multicrop import MultiCropTransform, blur_kernel_size, normalise_views
from ssl_vit.data.transforms import crop_and_flip, to_channels_last_uint8

# The CPU path's constants (ssl_vit.data.multicrop; the tests check that both agree).
JITTER_P = 0.8
JITTER_RANGES = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))  # ColorJitter(0.4, 0.4, 0.2, 0.1)
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3  # v2.ColorJitter's operation indices
GRAYSCALE_P = 0.2
BLUR_P = (1.0, 0.1, 0.5)  # global 1, global 2, every local
SOLARIZE_P = (0.0, 0.2, 0.0)
SOLARIZE_THRESHOLD = 128
LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
HUE_TO_UINT8 = 255.0 + 1.0 - 1e-3  # v2.functional.to_dtype(float -> uint8, scale=True)


def view_probabilities(index: int) -> Tuple[float, float]:
    """``(blur p, solarize p)`` of view ``index`` (0, 1: global crops; 2...: local crops)."""
    slot = min(index, 2)
    return BLUR_P[slot], SOLARIZE_P[slot]


# -- CPU side ----------------------------------------------------------------------------------------
def _crop_and_flip(view: v2.Compose) -> v2.Compose:
    """The crop and flip of a ``MultiCropTransform`` view, then uint8 ``[3, s, s]`` output."""
    steps = [t for t in view.transforms if isinstance(t, (v2.RandomResizedCrop, v2.RandomHorizontalFlip))]
    if [type(t) for t in steps] != [v2.RandomResizedCrop, v2.RandomHorizontalFlip]:
        raise RuntimeError(f"expected a RandomResizedCrop then a RandomHorizontalFlip in the view {view}")
    return v2.Compose(steps + [v2.ToImage(), v2.ToPureTensor()])


class MultiCropCrops(MultiCropTransform):
    """The loader half: PIL image (or uint8 ``[3, H, W]``) -> ``2 + num_local`` uint8 crops.

    Same arguments and crops as :class:`MultiCropTransform`; ``mean``, ``std`` and ``blur_sigma`` are
    kept for :meth:`device_augment`, which builds the device half.

    Returns (``__call__``):
        ``[global_1, global_2, local_1, ...]``: uint8 tensors ``[3, global_size, global_size]`` then
        ``[3, local_size, local_size]``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # MultiCropTransform's arguments
        if kwargs.get("fused_views"):
            raise ValueError(
                "MultiCropCrops: fused_views applies to the CPU colour operations, which MultiCropCrops leaves to "
                "the device (MultiCropGPUAugment): drop fused_views"
            )
        if kwargs.get("uint8_views"):
            raise ValueError(
                "MultiCropCrops: its views are always uint8 (MultiCropGPUAugment normalises them): drop uint8_views"
            )
        super().__init__(*args, **kwargs)
        self.views = [_crop_and_flip(view) for view in self.views]

    def __call__(self, image: Any) -> List[Tensor]:
        if not self.torch_resize:
            return super().__call__(image)
        # torch_resize: the views' own crop and flip called directly on the one channels-last tensor
        x = to_channels_last_uint8(self._checked(image))
        return [crop_and_flip(x, view.transforms[0], view.transforms[1]) for view in self.views]

    def device_augment(self, seed: Optional[int] = None, compile: bool = False) -> "MultiCropGPUAugment":
        """The device half with this transform's ``mean``, ``std`` and ``blur_sigma``."""
        return MultiCropGPUAugment(self.mean, self.std, self.blur_sigma, seed=seed, compile=compile)


# -- device side: parameters -------------------------------------------------------------------------
@dataclass
class ViewParams:
    """Per-sample parameters of one view batch (all on the batch's device).

    Attributes:
        jitter: apply the colour jitter, ``[B]`` bool.
        order: order of the jitter operations (a permutation of BRIGHTNESS..HUE), ``[B, 4]`` long.
        factors: brightness, contrast, saturation and hue factors, ``[B, 4]`` float.
        grayscale: convert to grayscale, ``[B]`` bool.
        blur: blur, ``[B]`` bool.
        sigma: blur sigma in pixels, ``[B]`` float.
        solarize: solarise, ``[B]`` bool.
    """

    jitter: Tensor
    order: Tensor
    factors: Tensor
    grayscale: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor

    @staticmethod
    def cat(params: Sequence["ViewParams"]) -> "ViewParams":
        """Parameters of several view batches, concatenated along the batch."""
        if len(params) == 1:
            return params[0]
        return ViewParams(*(torch.cat([getattr(p, f.name) for p in params]) for f in fields(params[0])))


def sample_view_params(
    batch_size: int,
    blur_p: float,
    solarize_p: float,
    blur_sigma: Tuple[float, float],
    device: torch.device,
    generator: Optional[torch.Generator] = None,
) -> ViewParams:
    """Draw one view batch's parameters with the CPU path's distributions (``v2.RandomApply``:
    applied when ``u < p``; ``v2.ColorJitter``: uniform factors, uniformly random order)."""
    u = torch.rand(batch_size, 9, generator=generator, device=device)  # [B, 9]
    order = torch.rand(batch_size, 4, generator=generator, device=device).argsort(dim=1)  # [B, 4]
    factors = torch.stack([lo + (hi - lo) * u[:, i] for i, (lo, hi) in enumerate(JITTER_RANGES)], dim=1)
    lo, hi = blur_sigma
    return ViewParams(
        jitter=u[:, 4] < JITTER_P,
        order=order,
        factors=factors,
        grayscale=u[:, 5] < GRAYSCALE_P,
        blur=u[:, 6] < blur_p,
        sigma=lo + (hi - lo) * u[:, 7],
        solarize=u[:, 8] < solarize_p,
    )


# -- device side: batched ops on integer-valued float32 [B, 3, H, W] in [0, 255] -------------------------
def _per_sample(t: Tensor) -> Tensor:
    """``[B] -> [B, 1, 1, 1]`` for broadcasting over images."""
    return t.view(-1, 1, 1, 1)


def luma(x: Tensor) -> Tensor:
    """``[B, 3, H, W] -> [B, 1, H, W]`` float luma (torchvision's weights, not quantised)."""
    r, g, b = x.unbind(dim=1)
    return r.mul(LUMA[0]).add(g, alpha=LUMA[1]).add(b, alpha=LUMA[2]).unsqueeze(1)


def blend(x: Tensor, op: Tensor, factor: Tensor) -> Tensor:
    """Brightness, contrast or saturation (``op`` ``[B]``) with ``factor`` ``[B]``, as on uint8:
    ``trunc(clamp(f * x + (1 - f) * d, 0, 255))`` where ``d`` is 0 (brightness), the mean of the
    floored luma (contrast) or the floored luma per pixel (saturation). ``f = 1`` is the identity."""
    gray = luma(x).floor()  # [B, 1, H, W]
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
    op = _per_sample(op)
    degenerate = torch.where(op == SATURATION, gray, torch.where(op == CONTRAST, mean, torch.zeros_like(mean)))
    f = _per_sample(factor)
    return (x * f).add_(degenerate * (1.0 - f)).clamp_(0.0, 255.0).trunc_()


def rgb_to_hsv(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``[B, 3, H, W]`` RGB in [0, 1] -> hue, saturation, value ``[B, H, W]`` each, in [0, 1] (hue as a
    fraction of the turn)."""
    r, g, _ = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)  # [B, H, W]
    flat = maxc == minc
    spread = maxc - minc
    s = spread / torch.where(flat, torch.ones_like(maxc), maxc)
    rc, gc, bc = ((maxc.unsqueeze(1) - x) / torch.where(flat, torch.ones_like(spread), spread).unsqueeze(1)).unbind(1)
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, (rc + 2.0) - bc, (gc + 4.0) - rc))
    return (h / 6.0 + 1.0).fmod(1.0), s, maxc


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """Hue, saturation, value ``[B, H, W]`` -> RGB ``[B, 3, H, W]``, branch-free: channel ``n`` (5, 3, 1
    for R, G, B) is ``v - v s clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h) mod 6``."""
    h6 = h * 6.0
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        channels.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)


def adjust_hue(x: Tensor, hue: Tensor) -> Tensor:
    """Rotate the hue by ``hue`` ``[B]`` (fraction of a turn) as on uint8: ``trunc(255.999 * rgb)``."""
    h, s, v = rgb_to_hsv(x * (1.0 / 255.0))
    rgb = hsv_to_rgb(torch.remainder(h + hue.view(-1, 1, 1), 1.0), s, v)
    return (rgb * HUE_TO_UINT8).trunc()


def color_jitter(x: Tensor, apply: Tensor, order: Tensor, factors: Tensor) -> Tensor:
    """``v2.ColorJitter`` per sample: the four operations in ``order`` ``[B, 4]`` with ``factors``
    ``[B, 4]`` where ``apply`` ``[B]``. The three blends before the hue run as three slot passes
    (factor 1 where inactive), then the hue once, then the blends after it: 6 blends and 1 hue per
    batch, whatever the orders."""
    hue_slot = (order == HUE).int().argmax(dim=1)  # [B]
    slot_factors = factors.gather(1, order)  # [B, 4]: the factor of the operation in each slot
    for slot in (0, 1, 2):  # blends before the hue (slot < hue_slot; slot 3 never is)
        active = apply & (slot < hue_slot)
        x = blend(x, order[:, slot], torch.where(active, slot_factors[:, slot], 1.0))
    x = torch.where(_per_sample(apply), adjust_hue(x, factors[:, HUE]), x)
    for slot in (1, 2, 3):  # blends after the hue (slot > hue_slot; slot 0 never is)
        active = apply & (slot > hue_slot)
        x = blend(x, order[:, slot], torch.where(active, slot_factors[:, slot], 1.0))
    return x


def grayscale(x: Tensor) -> Tensor:
    """``[B, 3, H, W]`` -> the truncated luma on all three channels (``v2.RandomGrayscale`` on uint8)."""
    return luma(x).trunc().expand_as(x)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Gaussian blur of integer-valued float ``[B, C, H, W]`` with a per-sample ``sigma`` ``[B]``: one
    grouped separable convolution (one channel per group), reflect padding, rounded as
    ``v2.GaussianBlur`` on uint8."""
    b, c, h, w = x.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # [K]
    kernel = torch.softmax(-0.5 * (offsets / sigma.unsqueeze(1)) ** 2, dim=1)  # [B, K]
    kernel = kernel.repeat_interleave(c, dim=0)  # [B * C, K]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    y = padded.reshape(1, b * c, h + 2 * radius, w + 2 * radius)
    y = F.conv2d(y, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)  # [1, B * C, H + 2r, W]
    y = F.conv2d(y, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)  # [1, B * C, H, W]
    return y.view(b, c, h, w).round()


def augment_view(x: Tensor, p: ViewParams, kernel_size: int, mean: Tensor, std: Tensor) -> Tensor:
    """One view batch, uint8 ``[B, 3, s, s]`` -> normalised float32 ``[B, 3, s, s]``: jitter,
    grayscale, blur, solarise, normalise, each where its flag in ``p`` is set."""
    x = x.float()
    x = color_jitter(x, p.jitter, p.order, p.factors)
    x = torch.where(_per_sample(p.grayscale), grayscale(x), x)
    x = torch.where(_per_sample(p.blur), gaussian_blur(x, p.sigma, kernel_size), x)
    x = torch.where(_per_sample(p.solarize) & (x >= SOLARIZE_THRESHOLD), 255.0 - x, x)
    return normalise_views(x, mean, std)  # the CPU path's operations, in their order


@functools.lru_cache(maxsize=None)
def _compiled_augment_view() -> Callable[..., Tensor]:
    """:func:`augment_view` compiled once per process (dynamo then keeps one graph per view shape)."""
    return torch.compile(augment_view, dynamic=False)


class MultiCropGPUAugment(nn.Module):
    """The device half: list of uint8 view batches -> list of augmented, normalised float32 batches.

    View ``i`` gets view ``i``'s probabilities (:func:`view_probabilities`) and a blur kernel of
    ``blur_kernel_size(s)`` for its side ``s``, as in :class:`MultiCropTransform`.

    Args:
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        blur_sigma: range of the blur sigma, in pixels.
        seed: seeds a private generator per device (plus the distributed rank, so ranks differ);
            ``None`` draws from the device's default generator (seeded by ``seed_everything``).
        compile: run the ops through ``torch.compile`` (one graph per view size; fuses the ~75
            elementwise passes of the eager path into a few kernels: use it on GPUs).
    """

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        seed: Optional[int] = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"MultiCropGPUAugment: mean and std need 3 values (std > 0), got {mean}, {std}")
        if len(blur_sigma) != 2 or not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(
                f"MultiCropGPUAugment: blur_sigma must be (min, max) with 0 < min <= max, got {blur_sigma}"
            )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.seed, self.compile = seed, compile
        self._generators: Dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        """This module's generator on ``device`` (created on first use), or ``None`` without a seed."""
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed + rank)
        return self._generators[key]

    def sample(self, index: int, batch_size: int, device: torch.device) -> ViewParams:
        """Parameters for view ``index`` of a batch of ``batch_size``."""
        blur_p, solarize_p = view_probabilities(index)
        return sample_view_params(batch_size, blur_p, solarize_p, self.blur_sigma, device, self.generator(device))

    def forward(self, views: Sequence[Tensor], params: Optional[Sequence[ViewParams]] = None) -> List[Tensor]:
        """Augment every view batch (``params``: fixed parameters per view, for tests).

        Args:
            views: uint8 ``[B, 3, s, s]`` per view (2 global views first).
        Returns:
            float32 ``[B, 3, s, s]`` per view.
        """
        if params is not None and len(params) != len(views):
            raise ValueError(f"MultiCropGPUAugment: {len(params)} parameter sets for {len(views)} views")
        for i, x in enumerate(views):
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
                raise ValueError(
                    f"MultiCropGPUAugment: view {i} must be a uint8 [B, 3, s, s] batch (MultiCropCrops), got a "
                    f"{x.dtype} tensor of shape {tuple(x.shape)}"
                )
        if params is None:
            params = [self.sample(i, x.shape[0], x.device) for i, x in enumerate(views)]
        apply = _compiled_augment_view() if self.compile else augment_view
        # views of one size run as one batch (2 calls for 2 + 10 crops, not 12: fewer kernel launches)
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for i, x in enumerate(views):
            groups.setdefault(tuple(x.shape[1:]), []).append(i)
        out: List[Optional[Tensor]] = [None] * len(views)
        for indices in groups.values():
            x = torch.cat([views[i] for i in indices]) if len(indices) > 1 else views[indices[0]]
            p = ViewParams.cat([params[i] for i in indices])
            mean, std = self.mean.to(x.device), self.std.to(x.device)
            with torch.autocast(device_type=x.device.type, enabled=False):
                y = apply(x, p, blur_kernel_size(x.shape[-1]), mean, std)
            for i, part in zip(indices, y.split([views[i].shape[0] for i in indices])):
                out[i] = part
        return out  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"blur_sigma={self.blur_sigma}, seed={self.seed}, compile={self.compile}"
