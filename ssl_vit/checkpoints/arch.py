"""What architecture a backbone file holds: inferred from tensor shapes (``infer_arch``) when the file
does not say, and compared field by field (``architecture_differences``) when it says one name and
the caller asks for another.

Names are not architectures: ``vit_tiny_patch16`` and ``vit_tiny_patch16_224`` are the same network,
and ``vit_tiny_patch4_32`` with ``embed_dim=32`` is not a ViT-Tiny. Two descriptions are compared
as built (on the meta device: no memory, no init cost) by the fields that make them different
networks: width, depth, heads, MLP ratio and kind, patch size, channels, class / register tokens,
position embedding present, its class-token slot, qkv bias, qk-norm, layer scale, pre-norm. The
image size (the position embedding is resampled), the pooling (the file's is used unless asked
otherwise) and run-time options (drop path, dynamic size) are not architecture.
"""
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ssl_vit.models.backbone import VIT_SIZES, create_backbone

# Heads of the standard ViT sizes, by width (ViT paper, Table 1).
HEADS_BY_WIDTH = {width: heads for width, _, heads in VIT_SIZES.values()}


# -- comparing two descriptions ----------------------------------------------------------------------
def describe_architecture(model: VisionTransformer) -> Dict[str, Any]:
    """The fields that make ``model`` the network it is, read off its public modules."""
    desc: Dict[str, Any] = dict(
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        patch_size=tuple(model.patch_embed.patch_size),
        in_chans=model.patch_embed.proj.in_channels,
        class_token=model.cls_token is not None,
        reg_tokens=getattr(model, "num_reg_tokens", 0),
        pos_embed=model.pos_embed is not None,
        no_embed_class=model.no_embed_class,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
    )
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
            layer_scale=not isinstance(getattr(block, "ls1", nn.Identity()), nn.Identity),
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
def grid_side(tokens: int, name: str) -> int:
    """Side of a square patch grid of ``tokens`` positions (``ValueError`` naming ``name`` if none)."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{name} has {tokens} patch positions, not a square grid: give img_size")
    return side


def pos_embed_kwargs(state: Mapping[str, Tensor]) -> Dict[str, Any]:
    """``img_size`` the file's position embedding was built for (square grids)."""
    if "pos_embed" not in state:
        return {}
    patch = state["patch_embed.proj.weight"].shape[-1]
    prefix = ("cls_token" in state) + (state["reg_token"].shape[1] if "reg_token" in state else 0)
    tokens = state["pos_embed"].shape[1]
    if math.isqrt(tokens - prefix) ** 2 == tokens - prefix:
        return {"img_size": math.isqrt(tokens - prefix) * patch}
    return {"img_size": grid_side(tokens, "pos_embed") * patch, "no_embed_class": True}


def infer_arch(state: Mapping[str, Tensor], num_heads: Optional[int] = None) -> Tuple[str, Dict[str, Any]]:
    """``create_backbone`` name and kwargs of a timm-layout ViT state dict, from tensor shapes.

    Width, depth, patch size, channels, MLP ratio, qkv bias, class / register tokens, layer scale,
    qk-norm and image size (from ``pos_embed``) are read off the tensors; heads come from the ViT
    table by width (``num_heads`` is needed for other widths).
    """
    if "patch_embed.proj.weight" not in state:
        raise KeyError(f"not a timm-layout ViT state dict: no patch_embed.proj.weight among {sorted(state)[:10]}...")
    embed_dim, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    depth = max(blocks) + 1 if blocks else 0
    if num_heads is None:
        if embed_dim not in HEADS_BY_WIDTH:
            raise ValueError(
                f"cannot infer the number of heads of a {embed_dim}-wide ViT (depth {depth}, patch {patch}): "
                f"the ViT table knows widths {sorted(HEADS_BY_WIDTH)}; pass arch=... or num_heads=..."
            )
        num_heads = HEADS_BY_WIDTH[embed_dim]
    size = next((s for s, dims in VIT_SIZES.items() if dims == (embed_dim, depth, num_heads)), None)
    kwargs: Dict[str, Any] = {} if size else dict(embed_dim=int(embed_dim), depth=depth, num_heads=int(num_heads))
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
    if "pos_embed" not in state:
        kwargs["pos_embed"] = "none"
    kwargs.update(pos_embed_kwargs(state))
    return f"vit_{size or _nearest_size(embed_dim)}_patch{patch}", kwargs


def _nearest_size(width: int) -> str:
    return min(VIT_SIZES, key=lambda s: abs(VIT_SIZES[s][0] - width))

