"""Self-attention maps of a timm Vision Transformer, read on the manual attention path.

Training runs on fused attention (``F.scaled_dot_product_attention``), which never materialises the
attention matrix. To read it, the block(s) of interest are switched to timm's manual path for the
duration of one forward (``blk.attn.fused_attn = False``) and the softmax is captured with a forward
hook on ``blk.attn.attn_drop``: timm's ``Attention`` applies ``attn_drop`` right after the softmax on
that path (checked in timm 1.0.3, 1.0.20 and 1.0.31). Every other block keeps fused attention, and
every flag, hook and train/eval mode is restored afterwards, even on error.

On the same weights, ``self_attention(model, x)`` equals facebookresearch/dino's
``get_last_selfattention(x)``: the softmax of ``q k^T * scale`` of the last block, computed on that
block's input. The rest of this module is math on attention maps: CLS->patch maps, attention
rollout (Abnar and Zuidema, 2020), masks that keep a fraction of the attention mass (DINO's
visualisation) and their Jaccard index with a foreground mask.
"""
from contextlib import contextmanager
from typing import Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vit.models.backbone import patch_size

HeadFusion = Literal["mean", "max", "min"]


def check_image_size(model: nn.Module, images: torch.Tensor) -> Tuple[int, int]:
    """Check that ``images`` fit the model and return the patch grid ``(h, w)``.

    Raises:
        ValueError: naming the size and the patch size when a side is not a multiple of the patch,
            or naming the model's only accepted size when it was built without ``dynamic_img_size``.
    """
    for attribute in ("patch_embed", "blocks", "forward_intermediates"):
        if not hasattr(model, attribute):
            raise TypeError(f"{type(model).__name__} has no `{attribute}`: attention maps need a timm VisionTransformer")
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    patch = patch_size(model)
    if height % patch or width % patch:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of the patch size {patch}: "
            f"crop or resize to e.g. {height // patch * patch}x{width // patch * patch}"
        )
    fixed = getattr(model.patch_embed, "img_size", None)
    if not getattr(model, "dynamic_img_size", False) and fixed is not None and tuple(fixed) != (height, width):
        raise ValueError(
            f"image size {height}x{width} differs from {fixed[0]}x{fixed[1]}, the only size this model "
            "accepts: it was built without dynamic_img_size (build it with "
            "ssl_vit.create_backbone(..., dynamic_img_size=True), which resamples the position embedding)"
        )
    return height // patch, width // patch


def _attention_module(model: nn.Module, index: int) -> nn.Module:
    attn = getattr(model.blocks[index], "attn", None)
    if attn is None or not hasattr(attn, "fused_attn") or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
        raise TypeError(
            f"block {index} ({type(model.blocks[index]).__name__}) has no timm Attention with `fused_attn` and "
            "`attn_drop`: attention maps need timm's standard ViT block layout"
        )
    return attn


@contextmanager
def manual_attention(model: nn.Module, layers: Sequence[int]) -> Iterator[Dict[int, torch.Tensor]]:
    """Run the given blocks on timm's manual attention path and capture their softmax.

    Yields a dict that the next forward fills with ``layer -> [B, heads, T, T]``. Only the listed
    blocks are switched; their ``fused_attn`` flags and the hooks are restored on exit.
    """
    modules = {i: _attention_module(model, i) for i in layers}
    saved = {i: (attn.fused_attn, "fused_attn" in vars(attn)) for i, attn in modules.items()}
    captured: Dict[int, torch.Tensor] = {}
    handles = []

    def hook_for(index: int):
        def hook(module: nn.Module, args: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            captured[index] = args[0]  # the softmax itself, before dropout  # [B, heads, T, T]
        return hook

    try:
        for i, attn in modules.items():
            attn.fused_attn = False
            handles.append(attn.attn_drop.register_forward_hook(hook_for(i)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        for i, attn in modules.items():
            value, own = saved[i]
            if own:
                attn.fused_attn = value
            else:  # the flag was a class attribute: drop the instance override
                vars(attn).pop("fused_attn", None)


def _capture(model: nn.Module, images: torch.Tensor, layers: Sequence[int]) -> List[torch.Tensor]:
    """Post-softmax attention ``[B, heads, T, T]`` of each block in ``layers`` (non-negative, sorted).

    Runs the model only up to the last of those blocks, in eval mode and without gradients.
    """
    grid = check_image_size(model, images)
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), manual_attention(model, layers) as captured:
            model.forward_intermediates(
                images, indices=[max(layers)], stop_early=True, intermediates_only=True, output_fmt="NLC"
            )
    finally:
        for module, mode in modes.items():
            module.training = mode
    tokens = prefix + grid[0] * grid[1]
    out = []
    for i in layers:
        attn = captured.get(i)
        if attn is None:
            raise RuntimeError(
                f"block {i} ran but its attn_drop was not called: this timm version's Attention does not apply "
                "attn_drop after the softmax on the manual path, so the attention cannot be captured"
            )
        if attn.ndim != 4 or attn.shape[0] != images.shape[0] or attn.shape[-2:] != (tokens, tokens):
            raise RuntimeError(
                f"block {i}: captured a tensor of shape {tuple(attn.shape)}, expected [B, heads, {tokens}, {tokens}]"
            )
        out.append(attn)
    return out


def _layer_index(model: nn.Module, layer: int) -> int:
    depth = len(model.blocks)
    if not -depth <= layer < depth:
        raise ValueError(f"layer {layer} is out of range for a model with {depth} blocks")
    return layer % depth


def self_attention(model: nn.Module, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """Post-softmax self-attention of one block of a timm ``VisionTransformer``.

    Args:
        model: a timm ViT (e.g. from ``ssl_vit.create_backbone``). Sides that differ from the
            model's ``img_size`` need ``dynamic_img_size=True`` (the create_backbone default);
            otherwise a ``ValueError`` says so (no resampling is done behind the user's back).
        images: ``[B, C, H, W]``, both sides multiples of the patch size.
        layer: block index (negative counts from the end; -1 is the last block).

    Returns:
        ``[B, heads, T, T]`` with ``T = num_prefix_tokens + (H / P) * (W / P)``; rows sum to 1.
    """
    return _capture(model, images, [_layer_index(model, layer)])[0]


def all_attentions(model: nn.Module, images: torch.Tensor) -> List[torch.Tensor]:
    """Post-softmax self-attention of every block, first block first, from one forward.

    Args:
        model: a timm ViT; every block runs on the manual path during this call.
        images: ``[B, C, H, W]`` (sides multiples of the patch size).

    Returns:
        one ``[B, heads, T, T]`` per block; rows sum to 1.
    """
    return _capture(model, images, list(range(len(model.blocks))))


def fuse_heads(attention: torch.Tensor, head_fusion: HeadFusion = "mean") -> torch.Tensor:
    """``[B, heads, T, T]`` -> ``[B, T, T]`` by the mean, max or min over heads."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")


def rollout_from_attentions(
    attentions: Sequence[torch.Tensor], head_fusion: HeadFusion = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Attention rollout (Abnar and Zuidema, 2020) of per-layer attentions, first layer first.

    Each layer's attention ``[B, heads, T, T]`` is fused over heads; if ``discard_ratio > 0`` the
    ``floor(discard_ratio * T * T)`` smallest entries of each sample's fused ``[T, T]`` matrix are set
    to zero; then the identity is added (the residual connection) and rows renormalised to sum to 1.
    The result is the product ``A_L ... A_2 A_1`` ``[B, T, T]``: row ``i`` says how much output token
    ``i`` of the last layer draws on each input token.
    """
    if not attentions:
        raise ValueError("attention rollout needs at least one layer")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    batch, _, tokens, _ = attentions[0].shape
    eye = torch.eye(tokens, device=attentions[0].device, dtype=torch.float32)
    result = eye.expand(batch, tokens, tokens)
    for attention in attentions:
        fused = fuse_heads(attention.float(), head_fusion)  # [B, T, T]
        drop = int(discard_ratio * tokens * tokens)
        if drop > 0:
            flat = fused.flatten(1).clone()  # [B, T*T]
            lowest = flat.topk(drop, dim=-1, largest=False).indices
            fused = flat.scatter(-1, lowest, 0.0).view(batch, tokens, tokens)
        step = fused + eye
        step = step / step.sum(dim=-1, keepdim=True)
        result = step @ result
    return result


def attention_rollout(
    model: nn.Module, images: torch.Tensor, head_fusion: HeadFusion = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Attention rollout over all blocks of ``model`` (see ``rollout_from_attentions``).

    Args:
        model: a timm ViT; every block runs on the manual path during this call.
        images: ``[B, C, H, W]`` (sides multiples of the patch size).
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        discard_ratio: fraction of the smallest fused attention entries zeroed per layer.

    Returns:
        ``[B, T, T]`` (float32); rows sum to 1.
    """
    fuse_heads(torch.zeros(1, 1, 1, 1), head_fusion)  # fail on a bad name before the forward
    return rollout_from_attentions(all_attentions(model, images), head_fusion, discard_ratio)


def cls_patch_attention(attention: torch.Tensor, grid: Tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """The CLS token's attention over the patches, as maps on the patch grid.

    Args:
        attention: ``[B, heads, T, T]`` or ``[B, T, T]``; the CLS token is token 0 (timm puts it
            before any register tokens).
        grid: the patch grid ``(h, w)``.
        num_prefix_tokens: CLS + register tokens (``model.num_prefix_tokens``); must be >= 1.

    Returns:
        ``[B, heads, h, w]`` or ``[B, h, w]``.
    """
    if num_prefix_tokens < 1:
        raise ValueError("the model has no CLS token: CLS->patch attention maps need class_token=True")
    h, w = grid
    if attention.shape[-1] != num_prefix_tokens + h * w:
        raise ValueError(f"attention over {attention.shape[-1]} tokens does not fit {num_prefix_tokens} + {h}x{w}")
    return attention[..., 0, num_prefix_tokens:].reshape(*attention.shape[:-2], h, w)


def mass_threshold_masks(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """The smallest set of patches holding at least ``threshold`` of each map's attention mass.

    For each map ``a`` (non-negative, ``n`` entries, total ``S``), the entries are sorted in
    decreasing order and the first ``k`` kept, with ``k`` the smallest count whose cumulative sum is
    ``>= threshold * S``. No set of fewer patches reaches that mass, and dropping the smallest kept
    patch falls below it. Ties at the boundary are broken by position (stable sort). A map with
    zero mass keeps nothing. DINO's ``visualize_attention.py`` keeps the patches whose ascending
    cumulative share exceeds ``1 - threshold``: the same set up to floating-point rounding.

    Args:
        maps: ``[..., h, w]`` non-negative maps (e.g. ``[heads, h, w]``).
        threshold: fraction of the mass to keep, in ``(0, 1]``.

    Returns:
        bool ``[..., h, w]``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if maps.ndim < 2:
        raise ValueError(f"maps must be [..., h, w], got shape {tuple(maps.shape)}")
    flat = maps.detach().flatten(-2).double()  # [..., n]
    if (flat < 0).any():
        raise ValueError("attention maps must be non-negative")
    values, order = flat.sort(dim=-1, descending=True, stable=True)
    cumulative = values.cumsum(dim=-1)  # [..., n]
    total = cumulative[..., -1:]
    keep = (cumulative < threshold * total).sum(dim=-1, keepdim=True) + 1  # smallest k reaching the mass
    keep = torch.where(total > 0, keep.clamp(max=flat.shape[-1]), torch.zeros_like(keep))
    ranks = torch.arange(flat.shape[-1], device=flat.device)
    kept_sorted = ranks < keep  # [..., n] in sorted order
    mask = torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)
    return mask.view(maps.shape)


def jaccard_index(masks: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Jaccard index (intersection over union) between patch-grid masks and a pixel mask.

    Each mask ``[..., h, w]`` is upsampled to the target's resolution by nearest neighbour, as DINO
    does for its PASCAL VOC evaluation. Two empty masks agree perfectly (index 1).

    Args:
        masks: bool ``[..., h, w]`` (e.g. ``[heads, h, w]`` from ``mass_threshold_masks``).
        target: bool ``[H, W]`` foreground mask.

    Returns:
        float ``[...]``.
    """
    if target.ndim != 2:
        raise ValueError(f"target must be a [H, W] mask, got shape {tuple(target.shape)}")
    h, w = masks.shape[-2:]
    up = F.interpolate(masks.reshape(-1, 1, h, w).float(), size=tuple(target.shape), mode="nearest")
    up = up[:, 0] > 0.5  # [N, H, W]
    target = target.to(device=up.device, dtype=torch.bool)
    inter = (up & target).sum(dim=(-2, -1)).double()
    union = (up | target).sum(dim=(-2, -1)).double()
    score = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return score.view(masks.shape[:-2])


def attention_maps(
    model: nn.Module,
    images: torch.Tensor,
    layer: int = -1,
    rollout: bool = False,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """CLS->patch attention of one block and, optionally, of the rollout, from a single forward.

    Returns:
        ``([B, heads, h, w], [B, h, w] or None)``.
    """
    grid = check_image_size(model, images)
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    index = _layer_index(model, layer)
    if rollout:
        fuse_heads(torch.zeros(1, 1, 1, 1), head_fusion)
        layers = list(range(len(model.blocks)))
    else:
        layers = [index]
    attentions = _capture(model, images, layers)
    maps = cls_patch_attention(attentions[layers.index(index)], grid, prefix)
    if not rollout:
        return maps, None
    return maps, cls_patch_attention(rollout_from_attentions(attentions, head_fusion, discard_ratio), grid, prefix)


def best_head(scores: torch.Tensor) -> Tuple[int, float]:
    """Index and value of the highest per-head score ``[heads]``."""
    index = int(torch.argmax(scores))
    return index, float(scores[index])


__all__: List[str] = [
    "all_attentions", "attention_maps", "attention_rollout", "best_head", "check_image_size", "cls_patch_attention",
    "fuse_heads", "jaccard_index", "manual_attention", "mass_threshold_masks", "rollout_from_attentions",
    "self_attention",
]
