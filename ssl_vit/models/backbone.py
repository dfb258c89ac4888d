"""The one backbone factory: timm Vision Transformers, configured by name and keyword arguments.

Names follow ``vit_<size>_patch<P>[_<img>]``, with the sizes of the ViT papers (Dosovitskiy et al.,
Table 1; Zhai et al., "Scaling Vision Transformers", for g/14 and G/14)::

    tiny      192 wide, 12 deep,  3 heads, MLP  768     huge     1280 wide, 32 deep, 16 heads, MLP 5120
    small     384 wide, 12 deep,  6 heads, MLP 1536     giant    1408 wide, 40 deep, 16 heads, MLP 6144
    base      768 wide, 12 deep, 12 heads, MLP 3072     gigantic 1664 wide, 48 deep, 16 heads, MLP 8192
    large    1024 wide, 24 deep, 16 heads, MLP 4096

and any patch size (``vit_small_patch4`` for 32x32 images, ``vit_giant_patch14``). Width, depth, heads
and MLP ratio can be overridden by keyword for custom sizes. Any other timm Vision Transformer name
(``vit_base_patch16_224.augreg_in21k``, ``vit_small_patch14_reg4_dinov2``) is passed through to timm
as it is. The model has no classifier head; calling it returns the pooled feature ``[B, D]``.

Position embeddings (``pos_embed``) and stems (``stem``) are the ViT paper's design choices:

* ``"learn"``, ``"sincos"``, ``"none"``, ``"factorized"``: a timm ``VisionTransformer`` (the
  factorised 2-D table of the paper's appendix D.4 is added to it by :mod:`ssl_vit.models.pos_embed`);
* ``"rope"``: timm's ``Eva`` with 2-D rotary embeddings in every attention (RoPE-ViT's axial RoPE)
  and otherwise a plain ViT block; ``"rel_bias"``: timm's ``VisionTransformerRelPos`` with one 2-D
  relative position bias table shared by the blocks (:mod:`ssl_vit.models.rel_pos`);
* ``stem="conv"``: 3x3 stride-2 convolutions and a 1x1 projection instead of the patchify
  convolution (Xiao et al. 2021; :mod:`ssl_vit.models.stems`).
"""
import re
from typing import Any, Dict, Literal, NamedTuple, Optional, Tuple

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ssl_vit.models.pos_embed import (
    PosEmbedResample, add_factorized_pos_embed, has_factorized_pos_embed, set_pos_embed_resample, sincos_2d,
)
from ssl_vit.models.rel_pos import BACKBONE_TYPES, RELATIVE_POS_EMBEDS, relative_spec
from ssl_vit.models.stems import ConvStemEmbed, stem_depth


class ViTSize(NamedTuple):
    """One row of the ViT size table."""
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int

    @property
    def mlp_ratio(self) -> float:
        return self.mlp_dim / self.embed_dim


# The ViT papers' sizes: Ti/S/B/L/H (Dosovitskiy et al., Table 1), g/14 and G/14 (Zhai et al., Table 2).
VIT_SIZES: Dict[str, ViTSize] = {
    "tiny": ViTSize(192, 12, 3, 768),
    "small": ViTSize(384, 12, 6, 1536),
    "base": ViTSize(768, 12, 12, 3072),
    "large": ViTSize(1024, 24, 16, 4096),
    "huge": ViTSize(1280, 32, 16, 5120),
    "giant": ViTSize(1408, 40, 16, 6144),
    "gigantic": ViTSize(1664, 48, 16, 8192),
}
# The timm model carrying each size (every size argument is passed explicitly anyway).
_TIMM_NAMES = {
    "tiny": "vit_tiny_patch16_224",
    "small": "vit_small_patch16_224",
    "base": "vit_base_patch16_224",
    "large": "vit_large_patch16_224",
    "huge": "vit_huge_patch14_224",
    "giant": "vit_giant_patch14_224",
    "gigantic": "vit_gigantic_patch14_224",
}
_NAME = re.compile(rf"^vit_(?P<size>{'|'.join(VIT_SIZES)})_patch(?P<patch>\d+)(?:_(?P<img>\d+))?$")

PosEmbed = Literal["learn", "sincos", "none", "factorized", "rope", "rel_bias"]
POS_EMBEDS = ("learn", "sincos", "none", "factorized", "rope", "rel_bias")
Stem = Literal["patch", "conv"]
STEMS = ("patch", "conv")
GlobalPool = Literal["token", "avg", "map"]


def resolve_arch(name: str, **kwargs: Any) -> Tuple[str, Dict[str, Any]]:
    """Translate an ssl_vit backbone name into a timm ``VisionTransformer`` name and the keyword
    arguments it needs (sizes from :data:`VIT_SIZES`, overridden by ``kwargs``)."""
    match = _NAME.match(name)
    if match is None:
        if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
            raise ValueError(
                f"unknown backbone {name!r}: use vit_<{'|'.join(VIT_SIZES)}>_patch<P>[_<img>] "
                "(e.g. vit_small_patch16, vit_tiny_patch4_32) or a timm Vision Transformer name"
            )
        return name, dict(kwargs)
    size = VIT_SIZES[match["size"]]
    resolved: Dict[str, Any] = dict(
        patch_size=int(match["patch"]),
        img_size=int(match["img"]) if match["img"] else 224,
        embed_dim=size.embed_dim,
        depth=size.depth,
        num_heads=size.num_heads,
        mlp_ratio=size.mlp_ratio,
    )
    resolved.update(kwargs)
    return _TIMM_NAMES[match["size"]], resolved


def timm_spec(
    name: str, pos_embed: PosEmbed = "learn", global_pool: GlobalPool = "token",
    dynamic_img_size: Optional[bool] = None, **kwargs: Any,
) -> Tuple[str, Dict[str, Any]]:
    """The timm model name and ``timm.create_model`` kwargs of a backbone with a timm-built position
    embedding (``"learn"``, ``"none"``, ``"rope"``, ``"rel_bias"``; ``"sincos"`` and ``"factorized"``
    are built as ``"learn"`` and ``"none"`` and filled in afterwards). No stem, no drop path.

    ``dynamic_img_size=None`` means every input size where the model family allows it.
    """
    if pos_embed in RELATIVE_POS_EMBEDS:
        if _NAME.match(name) is None:
            raise ValueError(f"pos_embed={pos_embed!r} needs an ssl_vit name vit_<size>_patch<P>[_<img>], not {name!r}")
        return relative_spec(pos_embed, resolve_arch(name, **kwargs)[1], global_pool, dynamic_img_size)
    timm_name, timm_kwargs = resolve_arch(name, **kwargs)
    timm_kwargs.update(
        pos_embed="learn" if pos_embed in ("learn", "sincos") else "none",
        global_pool=global_pool,
        dynamic_img_size=True if dynamic_img_size is None else dynamic_img_size,
    )
    return timm_name, timm_kwargs


def create_backbone(
    name: str,
    *,
    img_size: Any = None,
    pos_embed: PosEmbed = "learn",
    stem: Stem = "patch",
    global_pool: GlobalPool = "token",
    drop_path_rate: float = 0.0,
    dynamic_img_size: Optional[bool] = None,
    pos_embed_resample: PosEmbedResample = "timm",
    **kwargs: Any,
) -> nn.Module:
    """Build a timm Vision Transformer without a classifier head.

    Args:
        name: ``vit_<size>_patch<P>[_<img>]`` or a timm Vision Transformer name.
        img_size: the resolution the position embedding is built for (int or ``(H, W)``); other
            resolutions and aspect ratios work too, the embedding is resampled on the fly.
        pos_embed: ``"learn"`` (learned 1-D, the default), ``"sincos"`` (fixed 2-D sin-cos, as MAE
            uses; stored in ``pos_embed`` with ``requires_grad=False``), ``"none"``, ``"factorized"``
            (a learned table for the rows and one for the columns, each ``D/2`` wide, concatenated per
            patch: the ViT paper's appendix D.4), ``"rope"`` (2-D rotary embeddings, timm ``Eva``) or
            ``"rel_bias"`` (2-D relative position bias, timm ``VisionTransformerRelPos``; one grid).
        stem: ``"patch"`` (the patchify convolution) or ``"conv"`` (3x3 stride-2 convolutions with
            BatchNorm and ReLU, then a 1x1 projection: Xiao et al. 2021; patch sizes 4, 8, 16, 32...).
        global_pool: pooled representation: ``"token"`` (CLS token after the final norm),
            ``"avg"`` (mean of patch tokens, then a norm) or ``"map"`` (attention pooling).
        drop_path_rate: stochastic depth rate of the last block (linearly increasing).
        dynamic_img_size: accept every input size (resampling the position embedding); ``None``
            (default) means yes, except for ``"rel_bias"``, whose bias table fits one patch grid.
        pos_embed_resample: how a learned or factorised embedding is resampled to another grid:
            ``"timm"`` (timm's size-based, antialiased bicubic) or ``"dino"`` (the DINO reference's
            ``interpolate_pos_encoding``; what ssl_vit's DINO trains with). See
            ``ssl_vit.models.pos_embed.resample_pos_embed``.
        **kwargs: any other ``VisionTransformer`` argument (``embed_dim``, ``depth``, ``num_heads``,
            ``mlp_ratio``, ``qkv_bias``, ``norm_layer``...).

    Returns:
        A timm ``VisionTransformer`` (``Eva`` for ``"rope"``, ``VisionTransformerRelPos`` for
        ``"rel_bias"``).
    """
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if global_pool not in ("token", "avg", "map"):
        raise ValueError(f"global_pool must be 'token', 'avg' or 'map', got {global_pool!r}")
    if "num_classes" in kwargs and kwargs["num_classes"] != 0:
        raise ValueError("create_backbone builds backbones without a head: leave num_classes out")
    if "embed_layer" in kwargs:
        raise ValueError("give stem='patch' or 'conv' instead of embed_layer")
    if img_size is not None:
        kwargs["img_size"] = img_size
    timm_name, timm_kwargs = timm_spec(name, pos_embed, global_pool, dynamic_img_size, **kwargs)
    if stem == "conv" and "patch_size" in timm_kwargs:
        stem_depth(timm_kwargs["patch_size"])  # refuse before timm builds anything
    try:
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **timm_kwargs)
    except TypeError as err:  # another model family rejects the ViT keyword arguments
        raise ValueError(f"{name!r} is not a timm VisionTransformer, or takes other arguments: {err}") from err
    if not isinstance(model, BACKBONE_TYPES):
        raise ValueError(f"{name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    if stem == "conv":  # the same embedding with the stem in place of the patchify convolution
        model.patch_embed = ConvStemEmbed.like(model.patch_embed, image_channels(model))
    if pos_embed == "sincos":
        fill_sincos_pos_embed(model)
    elif pos_embed == "factorized":
        add_factorized_pos_embed(model)
    return set_pos_embed_resample(model, pos_embed_resample)


def fill_sincos_pos_embed(model: VisionTransformer) -> None:
    """Overwrite the model's position embedding with the fixed 2-D sin-cos one and freeze it
    (recorded as ``model.pos_embed_fixed``: a frozen backbone's learned table is frozen too)."""
    grid = model.patch_embed.grid_size
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    with torch.no_grad():
        model.pos_embed.copy_(sincos_2d(model.embed_dim, grid, prefix))
    model.pos_embed.requires_grad_(False)
    model.pos_embed_fixed = True


def backbone_options(model: nn.Module) -> Dict[str, str]:
    """``{"pos_embed": ..., "stem": ...}`` of a backbone, read off its modules (not its name); a table
    is ``"sincos"`` when :func:`fill_sincos_pos_embed` filled it, else ``"learn"``."""
    if getattr(model, "rope", None) is not None:
        pos = "rope"
    elif getattr(model, "shared_rel_pos", None) is not None:
        pos = "rel_bias"
    elif has_factorized_pos_embed(model):
        pos = "factorized"
    elif getattr(model, "pos_embed", None) is None:
        pos = "none"
    else:
        pos = "sincos" if getattr(model, "pos_embed_fixed", False) else "learn"
    return {"pos_embed": pos, "stem": "conv" if isinstance(model.patch_embed, ConvStemEmbed) else "patch"}


def image_channels(model: nn.Module) -> int:
    """The number of image channels a backbone takes (the stem's input, not its projection's)."""
    embed = model.patch_embed
    return int(getattr(embed, "in_chans", None) or embed.proj.in_channels)


def patch_size(model: nn.Module) -> int:
    """Square patch size of a backbone (non-square patches are not supported by ssl_vit)."""
    ph, pw = model.patch_embed.patch_size
    if ph != pw:
        raise ValueError(f"ssl_vit needs square patches, this backbone has {ph}x{pw}")
    return ph
