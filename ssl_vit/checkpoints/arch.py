"""What architecture a backbone file holds: inferred from tensor shapes (``infer_arch``) when the file
does not say, and compared field by field (``architecture_differences``) when it says one name and
the caller asks for another.

Names are not architectures: ``vit_tiny_patch16`` and ``vit_tiny_patch16_224`` are the same network,
and ``vit_tiny_patch4_32`` with ``embed_dim=32`` is not a ViT-Tiny. Two descriptions are compared
as built (on the meta device: no memory, no init cost) by the fields that make them different
networks: model family, width, depth, heads, MLP ratio and kind, patch size, stem, channels, class /
register tokens, position embedding kind, its class-token slot, qkv bias, qk-norm, layer scale, pre-norm. The
image size (the position embedding is resampled), the pooling (the file's is used unless asked
otherwise) and run-time options (drop path, dynamic size) are not architecture.
"""
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ssl_vit.models.backbone import VIT_SIZES, backbone_options, create_backbone, image_channels
from ssl_vit.models.pos_embed import FACTORIZED, grid_side

# Heads of the standard ViT sizes, by width (ViT paper, Table 1).
HEADS_BY_WIDTH = {size.embed_dim: size.num_heads for size in VIT_SIZES.values()}
_STEM = "patch_embed.proj.stem."  # a convolutional stem's 3x3 layers (ssl_vit.models.stems)
_REL_BIAS = "shared_rel_pos.relative_position_bias_table"


# -- comparing two descriptions ----------------------------------------------------------------------
def describe_architecture(model: nn.Module) -> Dict[str, Any]:
    """The fields that make ``model`` the network it is, read off its public modules."""
    desc: Dict[str, Any] = dict(
        family=type(model).__name__,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        patch_size=tuple(model.patch_embed.patch_size),
        in_chans=image_channels(model),
        class_token=getattr(model, "cls_token", None) is not None,
        reg_tokens=model.num_prefix_tokens - (getattr(model, "cls_token", None) is not None),
        no_embed_class=getattr(model, "no_embed_class", False),
        pre_norm=not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity),
        **backbone_options(model),
    )
    if desc["pos_embed"] == "sincos":  # a table of values like a learned one: a file of either loads as either
        desc["pos_embed"] = "learn"
    if len(model.blocks):
        block = model.blocks[0]
        attn, mlp = block.attn, block.mlp
        first_linear = next((m for m in mlp.modules() if isinstance(m, nn.Linear)), None)
        desc.update(
            block=type(block).__name__,
            num_heads=getattr(attn, "num_heads", None),
            qkv_bias=getattr(getattr(attn, "qkv", None), "bias", None) is not None,
            qk_norm=not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity),
            mlp_layer=type(mlp).__name__,
            mlp_ratio=first_linear.out_features / model.embed_dim if first_linear is not None else None,
            layer_scale=not isinstance(getattr(block, "ls1", nn.Identity()), nn.Identity)
            or getattr(block, "gamma_1", None) is not None,
        )
    return desc


def architecture_of(arch: str, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """``describe_architecture(create_backbone(arch, **kwargs))``, built on the meta device."""
    with torch.device("meta"):
        return describe_architecture(create_backbone(arch, **kwargs))


def architecture_differences(found: Mapping[str, Any], asked: Mapping[str, Any]) -> List[str]:
    """``"field: FOUND (file) vs ASKED (asked)"`` for every field that differs."""
    return [
        f"{key}: {found.get(key)!r} (file) vs {asked.get(key)!r} (asked)"
        for key in sorted(set(found) | set(asked))
        if found.get(key) != asked.get(key)
    ]


# -- inference from tensor shapes ----------------------------------------------------------------------
def stem_kwargs(state: Mapping[str, Tensor]) -> Tuple[int, int, int, Dict[str, Any]]:
    """``(embed_dim, in_chans, patch, kwargs)`` of the patch embedding in ``state``: the patchify
    convolution, or a convolutional stem (``log2(P)`` 3x3 layers, then a 1x1 projection)."""
    if "patch_embed.proj.weight" not in state:
        raise KeyError(f"not a timm-layout ViT state dict: no patch_embed.proj.weight among {sorted(state)[:10]}...")
    embed_dim, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
    layers = {int(k[len(_STEM):].split(".")[0]) for k in state if k.startswith(_STEM)}
    if not layers:
        return int(embed_dim), int(in_chans), int(patch), {}
    return int(embed_dim), int(state[f"{_STEM}0.conv.weight"].shape[1]), 2 ** len(layers), {"stem": "conv"}


def pos_embed_kwargs(state: Mapping[str, Tensor]) -> Dict[str, Any]:
    """``img_size`` the file's position embedding (learned, factorised or relative bias) was built
    for (square grids unless factorised), with the ``pos_embed`` kind when it is not ``"learn"``."""
    patch = stem_kwargs(state)[2]
    if all(key in state for key in FACTORIZED):
        rows, cols = (state[key].shape[1] for key in FACTORIZED)
        return {"img_size": [rows * patch, cols * patch], "pos_embed": "factorized"}
    prefix = ("cls_token" in state) + (state["reg_token"].shape[1] if "reg_token" in state else 0)
    if _REL_BIAS in state:  # (2 h - 1)^2 offsets, plus 3 entries with a class token
        side = (grid_side(state[_REL_BIAS].shape[0] - 3 * prefix, "the relative bias table") + 1) // 2
        return {"img_size": side * patch, "pos_embed": "rel_bias"}
    if "pos_embed" not in state:
        return {}
    tokens = state["pos_embed"].shape[1]
    if math.isqrt(tokens - prefix) ** 2 == tokens - prefix:
        return {"img_size": math.isqrt(tokens - prefix) * patch}
    return {"img_size": grid_side(tokens, "pos_embed") * patch, "no_embed_class": True}


def infer_arch(state: Mapping[str, Tensor], num_heads: Optional[int] = None) -> Tuple[str, Dict[str, Any]]:
    """``create_backbone`` name and kwargs of a timm-layout ViT state dict, from tensor shapes.

    Width, depth, patch size and stem, channels, MLP ratio, qkv bias, class / register tokens, layer
    scale, qk-norm, the position embedding (learned, factorised, relative bias, none) and image size
    are read off the tensors; heads come from the ViT table by width (``num_heads`` is needed for
    other widths). RoPE has no weights: a bare RoPE state dict reads as ``pos_embed="none"`` (ssl_vit
    files and exports name their ``pos_embed``).
    """
    embed_dim, in_chans, patch, kwargs = stem_kwargs(state)
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    depth = max(blocks) + 1 if blocks else 0
    if num_heads is None:
        if embed_dim not in HEADS_BY_WIDTH:
            raise ValueError(
                f"cannot infer the number of heads of a {embed_dim}-wide ViT (depth {depth}, patch {patch}): "
                f"the ViT table knows widths {sorted(HEADS_BY_WIDTH)}; pass arch=... or num_heads=..."
            )
        num_heads = HEADS_BY_WIDTH[embed_dim]
    size = next((s for s, dims in VIT_SIZES.items() if dims[:3] == (embed_dim, depth, num_heads)), None)
    if not size:
        kwargs.update(embed_dim=int(embed_dim), depth=depth, num_heads=int(num_heads))
    if in_chans != 3:
        kwargs["in_chans"] = int(in_chans)
    if depth:
        kwargs["mlp_ratio"] = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
        if "blocks.0.attn.qkv.bias" not in state:
            kwargs["qkv_bias"] = False
        if "blocks.0.ls1.gamma" in state:
            kwargs["init_values"] = 1.0  # any value: the gammas are loaded
        if "blocks.0.attn.q_norm.weight" in state:
            kwargs["qk_norm"] = True
    if "cls_token" not in state:
        kwargs["class_token"] = False
    if "reg_token" in state:
        kwargs["reg_tokens"] = int(state["reg_token"].shape[1])
    if "norm_pre.weight" in state:
        kwargs["pre_norm"] = True
    if "pos_embed" not in state and not any(key in state for key in (*FACTORIZED, _REL_BIAS)):
        kwargs["pos_embed"] = "none"
    kwargs.update(pos_embed_kwargs(state))
    return f"vit_{size or _nearest_size(embed_dim)}_patch{patch}", kwargs


def _nearest_size(width: int) -> str:
    return min(VIT_SIZES, key=lambda s: abs(VIT_SIZES[s].embed_dim - width))

