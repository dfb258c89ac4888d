"""Images <-> flattened patches, in the patch layout of the MAE reference code.

A patch is flattened row by row, channels last: ``(p, q, c)`` order, i.e.
``[B, C, h*p, w*q] -> [B, h*w, p*q*C]`` as in facebookresearch/mae ``patchify``. Predictions of the
MAE decoder use the same layout, so reference checkpoints' ``decoder_pred`` rows line up.
"""
import math
from typing import Optional, Tuple

import torch
from einops import rearrange


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images into non-overlapping square patches.

    Args:
        images: ``[B, C, H, W]``; ``H`` and ``W`` divisible by ``patch_size``.
        patch_size: side ``p`` of a patch.

    Returns:
        ``[B, (H/p) * (W/p), p * p * C]``, patches in row-major grid order.
    """
    if images.ndim != 4:
        raise ValueError(f"patchify expects images [B, C, H, W], got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by the patch size {patch_size}")
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(
    patches: torch.Tensor, patch_size: int, grid_size: Optional[Tuple[int, int]] = None
) -> torch.Tensor:
    """Inverse of :func:`patchify`.

    Args:
        patches: ``[B, L, p * p * C]``.
        patch_size: side ``p`` of a patch.
        grid_size: patch grid ``(h, w)`` with ``h * w == L``; a square grid when omitted.

    Returns:
        ``[B, C, h * p, w * p]``.
    """
    if patches.ndim != 3:
        raise ValueError(f"unpatchify expects patches [B, L, p*p*C], got shape {tuple(patches.shape)}")
    num_patches, patch_dim = patches.shape[1:]
    if patch_dim % (patch_size * patch_size):
        raise ValueError(f"patch dimension {patch_dim} is not a multiple of {patch_size}x{patch_size}")
    if grid_size is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patches do not form a square grid: pass grid_size")
        grid_size = (side, side)
    rows, cols = grid_size
    if rows * cols != num_patches:
        raise ValueError(f"grid {rows}x{cols} does not hold {num_patches} patches")
    return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=rows, w=cols, p=patch_size, q=patch_size)
