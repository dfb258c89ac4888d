"""What architecture a backbone file holds, inferred from its tensor shapes when the file does not say."""
import math
from typing import Any, Dict, Mapping, Optional, Tuple

from torch import Tensor

from ssl_vit.models.backbone import VIT_SIZES

# Heads of the standard ViT sizes, by width (ViT paper, Table 1).
HEADS_BY_WIDTH = {width: heads for width, _, heads in VIT_SIZES.values()}


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

