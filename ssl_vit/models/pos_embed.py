"""Position embeddings: the fixed 2-D sine-cosine one (MAE, Sec. A.1 of He et al.), and resampling a
learned one to another patch grid in the convention the checkpoint was trained with."""
from typing import Literal, Sequence, Tuple

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn import functional as F


def sincos_2d(dim: int, grid_size: Tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, laid out as the MAE reference code lays it out.

    The first half of the channels encodes the column (x) coordinate, the second half the row (y);
    each half is ``[sin(pos * omega), cos(pos * omega)]`` with ``omega = 1 / 10000 ** (k / (dim / 4))``.
    Prefix tokens (CLS, registers) get zeros.

    Args:
        dim: embedding width, divisible by 4.
        grid_size: patch grid ``(rows, cols)``.
        num_prefix_tokens: number of zero rows prepended.

    Returns:
        ``[1, num_prefix_tokens + rows * cols, dim]`` float32 tensor.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = grid_size
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # [D/4]
    y, x = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: torch.Tensor) -> torch.Tensor:  # [N] -> [N, D/2]
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(x), encode(y)], dim=1)  # [rows * cols, D]
    emb = torch.cat([torch.zeros(num_prefix_tokens, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


# -- resampling a learned position embedding to another patch grid -------------------------------------
# The one place ssl_vit resamples position embeddings, in one of two conventions:
#
# * "timm": timm's ``resample_abs_pos_embed``: bicubic to the target size, antialiased when shrinking.
# * "dino": facebookresearch/dino ``VisionTransformer.interpolate_pos_encoding``: bicubic, no
#   antialiasing, and ``scale_factor = (n + 0.1) / N`` per side (which sets the sampling positions,
#   ``src = (dst + 0.5) / scale - 0.5``). For DINO's 96-px local crops of a 224 model this gives a
#   2.4x stronger embedding at initialisation than "timm": training and evaluating a DINO model
#   faithfully needs this one.
PosEmbedResample = Literal["timm", "dino"]
POS_EMBED_RESAMPLE = ("timm", "dino")


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: Sequence[int],
    old_grid: Sequence[int],
    num_prefix_tokens: int = 1,
    mode: PosEmbedResample = "timm",
) -> torch.Tensor:
    """Resample the patch part of a ``[1, P + h * w, D]`` position embedding to another grid.

    Args:
        pos_embed: ``[1, num_prefix_tokens + old_h * old_w, D]``; the prefix rows (CLS...) are kept.
        new_grid: ``(rows, cols)`` wanted.
        old_grid: ``(rows, cols)`` of ``pos_embed``.
        num_prefix_tokens: leading rows that are not patches.
        mode: ``"timm"`` or ``"dino"`` (see above).

    Returns:
        ``[1, num_prefix_tokens + rows * cols, D]`` in the input's dtype (the input itself when the
        grids are equal).
    """
    if mode not in POS_EMBED_RESAMPLE:
        raise ValueError(f"pos_embed_resample must be one of {POS_EMBED_RESAMPLE}, got {mode!r}")
    new_grid, old_grid = (int(new_grid[0]), int(new_grid[1])), (int(old_grid[0]), int(old_grid[1]))
    if new_grid == old_grid:
        return pos_embed
    if mode == "timm":
        return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=list(old_grid),
                                      num_prefix_tokens=num_prefix_tokens)
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = patches.shape[-1]
    grid = patches.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # [1, D, h, w]
    scale = ((new_grid[0] + 0.1) / old_grid[0], (new_grid[1] + 0.1) / old_grid[1])
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(grid.shape[-2:]) != new_grid:
        raise RuntimeError(f"dino resampling of a {old_grid} grid gave {tuple(grid.shape[-2:])}, not {new_grid}")
    patches = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


class _PosEmbed:
    """``vit._pos_embed`` of a backbone built with ``pos_embed_resample="dino"``: timm's own steps
    (prefix tokens, position embedding, ``pos_drop``) with :func:`resample_pos_embed` for grids other
    than the native one. Installed on the instance by :func:`set_pos_embed_resample`; the test suite
    checks that with ``"timm"`` it equals timm's method at every size, so a change in timm shows."""

    def __init__(self, vit: VisionTransformer) -> None:
        self.vit = vit

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        prefix = [t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if x.ndim == 4:  # NHWC (dynamic_img_size)
            batch, rows, cols, dim = x.shape
            grid = (rows, cols)
            x = x.reshape(batch, rows * cols, dim)
        else:
            grid = tuple(vit.patch_embed.grid_size)
        if vit.pos_embed is None:
            return vit.pos_drop(torch.cat(prefix + [x], dim=1))
        num_pos_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        pos = resample_pos_embed(vit.pos_embed, grid, vit.patch_embed.grid_size, num_pos_prefix,
                                 vit.pos_embed_resample)
        if vit.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return vit.pos_drop(x)


def set_pos_embed_resample(vit: VisionTransformer, mode: PosEmbedResample) -> VisionTransformer:
    """Make every forward of ``vit`` (``forward``, ``forward_features``, ``forward_intermediates``)
    resample its position embedding in convention ``mode``; recorded as ``vit.pos_embed_resample``.
    ``"timm"`` leaves timm's own method in place."""
    if mode not in POS_EMBED_RESAMPLE:
        raise ValueError(f"pos_embed_resample must be one of {POS_EMBED_RESAMPLE}, got {mode!r}")
    if not callable(getattr(VisionTransformer, "_pos_embed", None)):
        raise RuntimeError("this timm version's VisionTransformer has no _pos_embed: pos_embed_resample='dino' "
                           "cannot be installed (pos_embed_resample='timm' works)")
    vit.pos_embed_resample = mode
    if mode == "timm":
        vit.__dict__.pop("_pos_embed", None)
    else:
        vit._pos_embed = _PosEmbed(vit)
    return vit


def pos_embed_resample(vit: nn.Module) -> PosEmbedResample:
    """The convention ``vit`` resamples its position embedding in (``"timm"`` unless set)."""
    return getattr(vit, "pos_embed_resample", "timm")
