"""Absolute position embeddings: the fixed 2-D sine-cosine one (MAE, Sec. A.1 of He et al.), the
factorised 2-D learned one (ViT paper, appendix D.4), and resampling either to another patch grid in
the convention the checkpoint was trained with. :func:`position_embedding` is the one place a
backbone's absolute embedding for a grid is computed (timm's forward via :class:`_PosEmbed`, the MAE
encoder, checkpoint loading)."""
import math
from typing import Dict, Literal, Optional, Sequence, Tuple

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
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
        found = position_embedding(vit, grid)
        if found is None:
            return vit.pos_drop(torch.cat(prefix + [x], dim=1))
        pos, num_pos_prefix = found
        if num_pos_prefix == 0:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return vit.pos_drop(x)


def set_pos_embed_resample(vit: VisionTransformer, mode: PosEmbedResample) -> VisionTransformer:
    """Make every forward of ``vit`` (``forward``, ``forward_features``, ``forward_intermediates``)
    resample its absolute position embedding in convention ``mode``; recorded as
    ``vit.pos_embed_resample``. ``"timm"`` leaves timm's own method in place, except for a factorised
    embedding, which timm does not know. Backbones without an absolute embedding (RoPE, relative
    bias: not ``VisionTransformer``) only record the mode."""
    if mode not in POS_EMBED_RESAMPLE:
        raise ValueError(f"pos_embed_resample must be one of {POS_EMBED_RESAMPLE}, got {mode!r}")
    vit.pos_embed_resample = mode
    if not isinstance(vit, VisionTransformer):
        return vit
    if not callable(getattr(VisionTransformer, "_pos_embed", None)):
        raise RuntimeError("this timm version's VisionTransformer has no _pos_embed: pos_embed_resample='dino' and "
                           "pos_embed='factorized' cannot be installed")
    if mode == "timm" and not has_factorized_pos_embed(vit):
        vit.__dict__.pop("_pos_embed", None)
    else:
        vit._pos_embed = _PosEmbed(vit)
    return vit


def pos_embed_resample(vit: nn.Module) -> PosEmbedResample:
    """The convention ``vit`` resamples its position embedding in (``"timm"`` unless set)."""
    return getattr(vit, "pos_embed_resample", "timm")


# -- the factorised 2-D learned embedding (ViT paper, appendix D.4) -----------------------------------
# One learned table for the rows and one for the columns, each D/2 wide; patch (i, j) gets
# [row_i, col_j]. Prefix tokens (CLS, registers) get none: a learned token plus a learned offset is
# just another learned token. Other grids resample each table along its own axis, which is exactly
# what resampling the expanded [h * w, D] table in 2-D gives (bicubic is separable, and each half
# is constant along the other axis): the timm export stores the expanded table.
FACTORIZED = ("pos_embed_row", "pos_embed_col")


def has_factorized_pos_embed(vit: nn.Module) -> bool:
    return isinstance(getattr(vit, FACTORIZED[0], None), torch.Tensor)


def add_factorized_pos_embed(vit: VisionTransformer) -> None:
    """Give ``vit`` (built with ``pos_embed="none"``) the two tables, ``pos_embed_row`` ``[1, h, D/2]``
    and ``pos_embed_col`` ``[1, w, D/2]``, initialised as timm initialises a learned embedding."""
    if vit.pos_embed is not None:
        raise ValueError("a factorised position embedding replaces pos_embed: build the ViT with pos_embed='none'")
    if vit.embed_dim % 2:
        raise ValueError(f"pos_embed='factorized' needs an even width (two halves), got {vit.embed_dim}")
    rows, cols = vit.patch_embed.grid_size
    weight = vit.patch_embed.proj.weight
    for name, length in zip(FACTORIZED, (rows, cols)):
        table = nn.Parameter(torch.empty(1, length, vit.embed_dim // 2, device=weight.device, dtype=weight.dtype))
        if not table.is_meta:
            trunc_normal_(table, std=0.02)
        setattr(vit, name, table)


def factorized_tables(row: torch.Tensor, col: torch.Tensor, grid: Sequence[int], old_grid: Sequence[int],
                      mode: PosEmbedResample) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two tables resampled to ``grid``, each along its own axis, in convention ``mode``."""
    return (resample_pos_embed(row, (grid[0], 1), (old_grid[0], 1), 0, mode),
            resample_pos_embed(col, (1, grid[1]), (1, old_grid[1]), 0, mode))


def expand_factorized(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``[1, h, D/2]`` rows and ``[1, w, D/2]`` columns -> ``[1, h * w, D]``, patch ``(i, j)`` = ``[row_i, col_j]``."""
    rows, cols, half = row.shape[1], col.shape[1], row.shape[-1]
    grid = torch.cat([row[:, :, None].expand(-1, -1, cols, -1), col[:, None].expand(-1, rows, -1, -1)], dim=-1)
    return grid.reshape(1, rows * cols, 2 * half)


def split_factorized(pos_embed: torch.Tensor, grid: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`expand_factorized` (reading the tables of an exported ``[1, h * w, D]`` one).

    Raises:
        ValueError: ``pos_embed`` is not such an expansion.
    """
    rows, cols = int(grid[0]), int(grid[1])
    full = pos_embed.reshape(rows, cols, -1)
    half = full.shape[-1] // 2
    row, col = full[:, :1, :half].reshape(1, rows, half), full[:1, :, half:].reshape(1, cols, half)
    if not torch.equal(expand_factorized(row, col), pos_embed.reshape(1, rows * cols, -1)):
        raise ValueError("this pos_embed is not a factorised one (rows x columns): it cannot load as pos_embed='factorized'")
    return row, col


def position_embedding(vit: nn.Module, grid: Sequence[int]) -> Optional[Tuple[torch.Tensor, int]]:
    """The absolute position embedding of ``vit`` for a ``(rows, cols)`` patch grid, in the model's
    resampling convention, and how many prefix rows (CLS, registers) lead it; ``None`` without one.

    Returns:
        ``([1, P' + rows * cols, D], P')``, ``P'`` = 0 or the number of prefix tokens.
    """
    mode = pos_embed_resample(vit)
    if has_factorized_pos_embed(vit):
        old = vit.patch_embed.grid_size
        return expand_factorized(*factorized_tables(vit.pos_embed_row, vit.pos_embed_col, grid, old, mode)), 0
    pos = getattr(vit, "pos_embed", None)
    if pos is None:
        return None
    num_pos_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    return resample_pos_embed(pos, grid, vit.patch_embed.grid_size, num_pos_prefix, mode), num_pos_prefix


def fit_position_state(state: Dict[str, torch.Tensor], model: nn.Module,
                       grid: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
    """A file's absolute position embedding resampled to ``model``'s grid, in the model's convention
    (for ``"dino"`` this equals the reference's run-time interpolation from the file's grid).

    Args:
        state: the file's weights; a factorised model also reads an exported full ``pos_embed``.
        model: the backbone the state will load into.
        grid: the grid the file's embedding was built for (square, read off its length, when None).

    Returns:
        ``state`` with ``pos_embed`` or the factorised tables fitted (other keys untouched; a width
        mismatch is left for the shape check to report).
    """
    state = dict(state)
    mode, new_grid = pos_embed_resample(model), tuple(model.patch_embed.grid_size)
    if has_factorized_pos_embed(model):
        if "pos_embed" in state and FACTORIZED[0] not in state:
            tokens = state.pop("pos_embed")
            side = grid_side(tokens.shape[1], "the file's pos_embed")
            state[FACTORIZED[0]], state[FACTORIZED[1]] = split_factorized(tokens, grid or (side, side))
        if all(key in state for key in FACTORIZED):
            old = (state[FACTORIZED[0]].shape[1], state[FACTORIZED[1]].shape[1])
            state[FACTORIZED[0]], state[FACTORIZED[1]] = factorized_tables(
                state[FACTORIZED[0]], state[FACTORIZED[1]], new_grid, old, mode)
        return state
    if "pos_embed" not in state or getattr(model, "pos_embed", None) is None:
        return state
    if state["pos_embed"].shape == model.pos_embed.shape or state["pos_embed"].shape[-1] != model.pos_embed.shape[-1]:
        return state
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    side = grid_side(state["pos_embed"].shape[1] - prefix, "the file's pos_embed")
    old = grid or (side, side)
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], new_grid, old, prefix, mode)
    return state


def grid_side(tokens: int, name: str) -> int:
    """Side of a square patch grid of ``tokens`` positions (``ValueError`` naming ``name`` if none)."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{name} has {tokens} patch positions, not a square grid: give img_size")
    return side
