"""The one backbone factory: timm Vision Transformers, configured by name and keyword arguments.

Names follow ``vit_<size>_patch<P>[_<img>]``, with the sizes of the ViT paper's table::

    tiny  192 wide, 12 deep,  3 heads      large 1024 wide, 24 deep, 16 heads
    small 384 wide, 12 deep,  6 heads      huge  1280 wide, 32 deep, 16 heads
    base  768 wide, 12 deep, 12 heads

and any patch size (``vit_small_patch4`` for 32x32 images, ``vit_huge_patch14``). Width, depth and
heads can be overridden by keyword for custom sizes. Any other timm Vision Transformer name
(``vit_base_patch16_224.augreg_in21k``, ``vit_small_patch14_reg4_dinov2``) is passed through to timm
as it is. The model has no classifier head; calling it returns the pooled feature ``[B, D]``.
"""
import re
from typing import Any, Dict, Literal, Tuple

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from ssl_vit.models.pos_embed import PosEmbedResample, set_pos_embed_resample, sincos_2d

# ViT paper, Table 1 (Dosovitskiy et al.): width, depth, heads; and the timm model carrying that size.
VIT_SIZES: Dict[str, Tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
_TIMM_NAMES = {
    "tiny": "vit_tiny_patch16_224",
    "small": "vit_small_patch16_224",
    "base": "vit_base_patch16_224",
    "large": "vit_large_patch16_224",
    "huge": "vit_huge_patch14_224",
}
_NAME = re.compile(r"^vit_(?P<size>tiny|small|base|large|huge)_patch(?P<patch>\d+)(?:_(?P<img>\d+))?$")

PosEmbed = Literal["learn", "sincos", "none"]
GlobalPool = Literal["token", "avg", "map"]


def resolve_arch(name: str, **kwargs: Any) -> Tuple[str, Dict[str, Any]]:
    """Translate an ssl_vit backbone name into a timm model name and the keyword arguments it needs.

    ``timm.create_model(*resolve_arch(name, **kw))`` builds the same architecture as
    ``create_backbone(name, **kw)`` (before any sin-cos position embedding is filled in), which is
    what the export to timm relies on.
    """
    match = _NAME.match(name)
    if match is None:
        if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
            raise ValueError(
                f"unknown backbone {name!r}: use vit_<tiny|small|base|large|huge>_patch<P>[_<img>] "
                "(e.g. vit_small_patch16, vit_tiny_patch4_32) or a timm Vision Transformer name"
            )
        return name, dict(kwargs)
    size, patch = match["size"], int(match["patch"])
    embed_dim, depth, num_heads = VIT_SIZES[size]
    resolved: Dict[str, Any] = dict(
        patch_size=patch,
        img_size=int(match["img"]) if match["img"] else 224,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
    )
    resolved.update(kwargs)
    return _TIMM_NAMES[size], resolved


def create_backbone(
    name: str,
    *,
    img_size: Any = None,
    pos_embed: PosEmbed = "learn",
    global_pool: GlobalPool = "token",
    drop_path_rate: float = 0.0,
    dynamic_img_size: bool = True,
    pos_embed_resample: PosEmbedResample = "timm",
    **kwargs: Any,
) -> VisionTransformer:
    """Build a timm ``VisionTransformer`` without a classifier head.

    Args:
        name: ``vit_<size>_patch<P>[_<img>]`` or a timm Vision Transformer name.
        img_size: the resolution the position embedding is built for (int or ``(H, W)``); other
            resolutions and aspect ratios work too, the embedding is resampled on the fly.
        pos_embed: ``"learn"`` (learned 1-D, the default), ``"sincos"`` (fixed 2-D sin-cos, as MAE
            uses; stored in ``pos_embed`` with ``requires_grad=False``) or ``"none"``.
        global_pool: pooled representation: ``"token"`` (CLS token after the final norm),
            ``"avg"`` (mean of patch tokens, then a norm) or ``"map"`` (attention pooling).
        drop_path_rate: stochastic depth rate of the last block (linearly increasing).
        dynamic_img_size: resample the position embedding for each input size.
        pos_embed_resample: how it is resampled to another grid: ``"timm"`` (timm's size-based,
            antialiased bicubic) or ``"dino"`` (the DINO reference's ``interpolate_pos_encoding``;
            what ssl_vit's DINO trains with). See ``ssl_vit.models.pos_embed.resample_pos_embed``.
        **kwargs: any other ``VisionTransformer`` argument (``embed_dim``, ``depth``, ``num_heads``,
            ``mlp_ratio``, ``qkv_bias``, ``norm_layer``...).
    """
    if pos_embed not in ("learn", "sincos", "none"):
        raise ValueError(f"pos_embed must be 'learn', 'sincos' or 'none', got {pos_embed!r}")
    if global_pool not in ("token", "avg", "map"):
        raise ValueError(f"global_pool must be 'token', 'avg' or 'map', got {global_pool!r}")
    if "num_classes" in kwargs and kwargs["num_classes"] != 0:
        raise ValueError("create_backbone builds backbones without a head: leave num_classes out")
    if img_size is not None:
        kwargs["img_size"] = img_size
    timm_name, timm_kwargs = resolve_arch(name, **kwargs)
    try:
        model = timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=0,
            pos_embed="none" if pos_embed == "none" else "learn",
            global_pool=global_pool,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=dynamic_img_size,
            **timm_kwargs,
        )
    except TypeError as err:  # another model family rejects the ViT keyword arguments
        raise ValueError(f"{name!r} is not a timm VisionTransformer, or takes other arguments: {err}") from err
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    if pos_embed == "sincos":
        fill_sincos_pos_embed(model)
    return set_pos_embed_resample(model, pos_embed_resample)


def fill_sincos_pos_embed(model: VisionTransformer) -> None:
    """Overwrite the model's position embedding with the fixed 2-D sin-cos one and freeze it."""
    grid = model.patch_embed.grid_size
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    with torch.no_grad():
        model.pos_embed.copy_(sincos_2d(model.embed_dim, grid, prefix))
    model.pos_embed.requires_grad_(False)


def patch_size(model: VisionTransformer) -> int:
    """Square patch size of a backbone (non-square patches are not supported by ssl_vit)."""
    ph, pw = model.patch_embed.patch_size
    if ph != pw:
        raise ValueError(f"ssl_vit needs square patches, this backbone has {ph}x{pw}")
    return ph
