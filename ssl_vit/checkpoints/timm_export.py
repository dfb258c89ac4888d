"""Export a backbone as a timm-loadable ``model.safetensors`` + ``config.json``.

The directory loads with no network and no ssl_vit::
    config = json.load(open(f"{out}/config.json"))
    model = timm.create_model(config["architecture"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=f"{out}/model.safetensors"),
                              **config["kwargs"])

and ``ssl_vit.load_backbone(out)`` reads it back. ``config.json`` also keeps the ``create_backbone``
name and kwargs under ``"ssl_vit"``. Every export is verified: the exported files are loaded back
through ``timm.create_model`` and must give the source backbone's outputs.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ssl_vit.checkpoints.io import PathLike
from ssl_vit.checkpoints.load import CONFIG_NAME, WEIGHTS_NAME, infer_arch, read_backbone
from ssl_vit.models.backbone import resolve_arch

# create_backbone arguments that are not timm architecture kwargs as such (read off the model instead).
_OWN_KWARGS = ("pos_embed", "global_pool", "drop_path_rate", "dynamic_img_size", "img_size", "pos_embed_resample")
# The architecture written for each standard size: a timm name whose pretrained config reads plain
# state-dict files (the default tags of vit_{tiny,small,large}_patch16_224 are Google .npz files
# with a custom loader, which older timm versions use for any file) and has no classifier
# (num_classes 0, so timm loads the file strictly). Width, depth, heads, patch and image size are
# always given as kwargs, so the name is a template: a ViT-Tiny export names the ViT-S DINO entry.
_TEMPLATES = {
    "vit_tiny_patch16_224": "vit_small_patch16_224.dino",
    "vit_small_patch16_224": "vit_small_patch16_224.dino",
    "vit_base_patch16_224": "vit_base_patch16_224.mae",
    "vit_large_patch16_224": "vit_large_patch16_224.mae",
    "vit_huge_patch14_224": "vit_huge_patch14_224.mae",
}


def timm_config(model: VisionTransformer, arch: str, kwargs: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """The timm model name and ``timm.create_model`` kwargs that rebuild ``model``.

    Args:
        model: the backbone (image size, pooling and dynamic size are read off it).
        arch: its ``create_backbone`` name.
        kwargs: its ``create_backbone`` kwargs.
    """
    name, timm_kwargs = resolve_arch(arch, **{k: v for k, v in kwargs.items() if k not in _OWN_KWARGS})
    if "embed_dim" in timm_kwargs and "depth" in timm_kwargs and "num_heads" in timm_kwargs:
        name = _TEMPLATES.get(name, name)  # an ssl_vit name: every size is explicit
    timm_kwargs.update(
        img_size=list(model.patch_embed.img_size),
        global_pool=model.global_pool,
        dynamic_img_size=bool(model.dynamic_img_size),
    )
    if model.pos_embed is None:
        timm_kwargs["pos_embed"] = "none"
    try:
        json.dumps(timm_kwargs)
    except TypeError as err:
        raise ValueError(f"backbone kwargs {timm_kwargs} cannot be written to {CONFIG_NAME}: {err}") from err
    return name, timm_kwargs


def describe_backbone(model: VisionTransformer) -> Tuple[str, Dict[str, Any]]:
    """``create_backbone`` name and kwargs of a backbone object, read off its weights and attributes
    (for models given without ``arch``; the export check catches anything this misses)."""
    arch, kwargs = infer_arch(model.state_dict(), num_heads=model.blocks[0].attn.num_heads if len(model.blocks) else 1)
    kwargs.update(img_size=list(model.patch_embed.img_size), global_pool=model.global_pool)
    kwargs.pop("no_embed_class", None)
    if model.no_embed_class:
        kwargs["no_embed_class"] = True
    return arch, kwargs


def load_exported(output_dir: PathLike) -> VisionTransformer:
    """Load an export directory exactly as a timm user would (``timm.create_model``, no ssl_vit)."""
    output_dir = Path(output_dir)
    config = json.loads((output_dir / CONFIG_NAME).read_text())
    return timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(output_dir / WEIGHTS_NAME)),
        num_classes=0,
        **config["kwargs"],
    ).eval()


def export_backbone(
    model_or_path: Union[nn.Module, PathLike],
    output_dir: PathLike,
    arch: Optional[str] = None,
    role: Optional[str] = None,
    check: bool = True,
    **kwargs: Any,
) -> Path:
    """Write ``output_dir/model.safetensors`` and ``output_dir/config.json`` for a backbone.

    Args:
        model_or_path: a timm ``VisionTransformer`` or any file ``load_backbone`` reads.
        output_dir: created if needed; existing export files are overwritten.
        arch: ``create_backbone`` name (for a path: as ``load_backbone``; for a model: read off the
            model when None).
        role: backbone role for multi-backbone files (DINO ``teacher`` / ``student``).
        check: load the export back through ``timm.create_model`` and compare outputs on a random
            batch; raise if they differ.
        **kwargs: ``create_backbone`` kwargs (for a path: as ``load_backbone``; for a model: its
            kwargs, used with ``arch``).

    Returns:
        ``output_dir``.
    """
    if isinstance(model_or_path, nn.Module):
        if role is not None:
            raise ValueError("role only applies to checkpoint files, not to a model object")
        if not isinstance(model_or_path, VisionTransformer):
            raise TypeError(f"export_backbone needs a timm VisionTransformer, got {type(model_or_path).__name__}")
        model = model_or_path
        if arch is None:
            if kwargs:
                raise ValueError(f"kwargs {sorted(kwargs)} given without arch")
            arch, kwargs = describe_backbone(model)
        source = f"{type(model).__name__} object"
    else:
        loaded = read_backbone(model_or_path, arch, role, **kwargs)
        model, arch, kwargs, source = loaded.model, loaded.arch, loaded.kwargs, f"{model_or_path} ({loaded.source})"
    if getattr(model, "num_classes", 0):
        raise ValueError(f"export_backbone exports backbones without a classifier; this model has {model.num_classes} classes")
    name, timm_kwargs = timm_config(model, arch, kwargs)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(output_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    readable_by_all(output_dir / WEIGHTS_NAME)  # safetensors creates it 0600, unlike every other file
    config = {
        "architecture": name,
        "kwargs": timm_kwargs,
        "num_features": int(model.num_features),
        "ssl_vit": {"arch": arch, "backbone_kwargs": {k: v for k, v in kwargs.items() if k != "drop_path_rate"}},
        "source": str(source),
    }
    (output_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    if check:
        verify_export(model, output_dir)
    return output_dir


@torch.no_grad()
def verify_export(model: VisionTransformer, output_dir: PathLike, batch: int = 2) -> None:
    """Raise ``RuntimeError`` unless the timm-loaded export gives ``model``'s outputs on random images."""
    exported = load_exported(output_dir)
    was_training = model.training
    model.eval()
    try:
        h, w = model.patch_embed.img_size
        images = torch.randn(batch, model.patch_embed.proj.in_channels, h, w, generator=torch.Generator().manual_seed(0))
        device = next(model.parameters()).device
        expected = model(images.to(device)).float().cpu()
        got = exported(images).float()
    finally:
        model.train(was_training)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else "shape"
        raise RuntimeError(
            f"export check failed: timm.create_model from {output_dir} does not reproduce the backbone "
            f"(max abs difference {diff}); the architecture kwargs in {CONFIG_NAME} are incomplete"
        )


def readable_by_all(path: Path) -> None:
    """Give ``path`` the permissions a plain ``open(path, "w")`` would (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
