"""Relative position options, built from timm's own ViT-family models (no attention written here):

* ``pos_embed="rope"``: timm ``Eva`` with ``attn_type="rope"``, 2-D rotary embeddings
  (``RotaryEmbeddingCat``: half of each head's channels rotate with the row, half with the column,
  at integer patch positions: RoPE-ViT's axial RoPE), no absolute embedding, and otherwise the
  plain ViT block (fused qkv with bias, GELU MLP, no layer scale): the same parameter names as a
  ``VisionTransformer``. The rotation is computed for whatever grid comes in, so every input size works.
* ``pos_embed="rel_bias"``: timm ``VisionTransformerRelPos`` with ``rel_pos_type="bias"`` and
  ``shared_rel_pos=True``: one learned ``(2h-1)(2w-1)`` table of per-head biases (plus the CLS
  entries), shared by every block (BEiT's shared relative position bias), added to the attention
  logits. The table is built for one patch grid: the model takes one input size; loading it at
  another size resizes the table with timm's ``resize_rel_pos_bias_table`` (as timm's
  ``set_input_size`` does).

The MAE encoder runs the blocks on a subset of the tokens: :func:`block_kwargs` gives the blocks the
rotation of the visible tokens (timm's ``apply_keep_indices_nlc``, as Eva's own patch dropout) or
the rows and columns of the shared bias that the visible tokens use.
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from timm.layers import apply_keep_indices_nlc, resize_rel_pos_bias_table
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from torch import nn

# The timm model families a backbone may be: ssl_vit's code paths all accept these three.
BACKBONE_TYPES = (VisionTransformer, Eva, VisionTransformerRelPos)
RELATIVE_POS_EMBEDS = ("rope", "rel_bias")
# timm entry points that take every argument below (their size arguments are all overridden)
_TIMM_NAMES = {"rope": "eva_giant_patch14_224", "rel_bias": "vit_relpos_base_patch16_224"}
# VisionTransformer arguments each family takes, with the name the family gives them
_COMMON = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
           "qk_norm", "class_token", "drop_rate", "proj_drop_rate", "attn_drop_rate")
_RENAMED = {
    "rope": {**{k: k for k in _COMMON}, "init_values": "init_values", "reg_tokens": "num_reg_tokens",
             "no_embed_class": "no_embed_class", "pre_norm": "use_pre_transformer_norm", "pos_drop_rate": "pos_drop_rate"},
    "rel_bias": {**{k: k for k in _COMMON}, "init_values": "init_values"},
}


def relative_spec(pos_embed: str, vit_kwargs: Dict[str, Any], global_pool: str,
                  dynamic_img_size: Optional[bool]) -> Tuple[str, Dict[str, Any]]:
    """timm name and ``create_model`` kwargs of a ``"rope"`` / ``"rel_bias"`` backbone with the sizes
    and options of ``vit_kwargs`` (``VisionTransformer`` argument names).

    Raises:
        ValueError: naming each argument the family does not take, a pooling or size mode it lacks.
    """
    names = _RENAMED[pos_embed]
    family = "Eva" if pos_embed == "rope" else "VisionTransformerRelPos"
    unknown = sorted(set(vit_kwargs) - set(names))
    if unknown:
        raise ValueError(f"pos_embed={pos_embed!r} builds timm's {family}, which has no {', '.join(unknown)} "
                         f"(it takes {', '.join(sorted(names))})")
    kwargs = {names[k]: v for k, v in vit_kwargs.items()}
    kwargs.setdefault("qkv_bias", True)
    kwargs["global_pool"] = global_pool
    if pos_embed == "rope":
        kwargs.update(attn_type="rope", qkv_fused=True, use_rot_pos_emb=True, use_abs_pos_emb=False, rope_type="cat",
                      dynamic_img_size=True if dynamic_img_size is None else dynamic_img_size)
        return _TIMM_NAMES[pos_embed], kwargs
    if global_pool == "map":
        raise ValueError("pos_embed='rel_bias' builds timm's VisionTransformerRelPos, which has no global_pool='map'")
    if not kwargs.setdefault("class_token", True) and global_pool == "token":
        raise ValueError("global_pool='token' needs the class token (class_token=True)")
    if dynamic_img_size:
        raise ValueError("pos_embed='rel_bias' has one relative bias table for one patch grid: it takes one input size "
                         "(dynamic_img_size=True is not possible; load it with img_size=... for another size)")
    # timm's create_model drops None arguments, so layer scale is switched off with 0 (falsy: no LayerScale)
    kwargs["init_values"] = kwargs.get("init_values") or 0.0
    kwargs.update(rel_pos_type="bias", shared_rel_pos=True, fc_norm=global_pool == "avg")
    return _TIMM_NAMES[pos_embed], kwargs


def fixed_grid(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The only patch grid a timm backbone takes (a relative bias table's, or a build without
    ``dynamic_img_size``), or ``None`` when any works (or ``model`` is no timm backbone)."""
    if not isinstance(model, BACKBONE_TYPES):
        return None
    if getattr(model, "shared_rel_pos", None) is not None or not getattr(model, "dynamic_img_size", False):
        return tuple(model.patch_embed.grid_size)
    return None


def check_input_size(model: nn.Module, size: Sequence[int], what: str) -> None:
    """Raise ``ValueError`` naming ``what`` when ``model`` takes one image size only and ``size`` is another."""
    if fixed_grid(model) is None or tuple(size) == tuple(model.patch_embed.img_size):
        return
    h, w = model.patch_embed.img_size
    reason = ("pos_embed='rel_bias': its relative bias table fits one patch grid"
              if getattr(model, "shared_rel_pos", None) is not None else "built with dynamic_img_size=False")
    raise ValueError(f"{what} is {size[0]}x{size[1]}, but this backbone takes {h}x{w} images only ({reason}); "
                     "use every view at that size (no local crops), or pos_embed='rope', which takes any size")


def block_kwargs(vit: nn.Module, grid: Sequence[int], keep: Optional[torch.Tensor], batch: int) -> Dict[str, Any]:
    """Keyword arguments of ``vit``'s blocks for the prefix tokens plus the patches ``keep``.

    Args:
        vit: the backbone.
        grid: patch grid ``(h, w)`` of the image.
        keep: ``[B, K]`` kept patch indices in ``[0, h * w)``, or ``None`` for all patches.
        batch: ``B``.

    Returns:
        ``{}`` for a ``VisionTransformer``; ``{"rope": ...}`` for RoPE (``[L, 2 * d]`` or
        ``[B, 1, K, 2 * d]``); ``{"shared_rel_pos": ...}`` for the relative bias (``[1, heads, T, T]``
        or ``[B, heads, P + K, P + K]``).
    """
    rope = getattr(vit, "rope", None)
    if rope is not None:
        embed = rope.get_embed(shape=tuple(grid))  # [h * w, 2 * d]
        if keep is not None:
            embed = apply_keep_indices_nlc(keep, embed, keep).unsqueeze(1)  # [B, 1, K, 2 * d]
        return {"rope": embed}
    shared = getattr(vit, "shared_rel_pos", None)
    if shared is None:
        return {}
    if tuple(grid) != tuple(shared.window_size):
        raise ValueError(f"pos_embed='rel_bias': this backbone's relative bias table fits a {shared.window_size[0]}x"
                         f"{shared.window_size[1]} patch grid, not {grid[0]}x{grid[1]}")
    bias = shared.get_bias()  # [1, heads, P + L, P + L]
    if keep is None:
        return {"shared_rel_pos": bias}
    prefix = torch.arange(vit.num_prefix_tokens, device=keep.device).expand(batch, -1)
    tokens = torch.cat([prefix, keep + vit.num_prefix_tokens], dim=1)  # [B, P + K]
    picked = bias[0][:, tokens[:, :, None], tokens[:, None, :]]  # [heads, B, P + K, P + K]
    return {"shared_rel_pos": picked.transpose(0, 1)}


def fit_rel_pos_state(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """A file's relative bias table resized to ``model``'s grid (timm's ``resize_rel_pos_bias_table``,
    what ``set_input_size`` does); other keys untouched."""
    shared = getattr(model, "shared_rel_pos", None)
    key = "shared_rel_pos.relative_position_bias_table"
    if shared is None or key not in state or state[key].shape == shared.relative_position_bias_table.shape:
        return state
    state = dict(state)
    state[key] = resize_rel_pos_bias_table(state[key], new_window_size=tuple(shared.window_size),
                                           new_bias_shape=tuple(shared.relative_position_bias_table.shape))
    return state
