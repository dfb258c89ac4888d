"""Export a backbone in timm's own format: a directory with ``model.safetensors`` and ``config.json``.

The directory is written by ``timm.models.save_for_hf`` (what ``timm.models.push_to_hf_hub`` uploads),
so it loads with timm alone and no network::

    model = timm.create_model("local-dir:exported/dino_vits16", pretrained=True)
    data_config = timm.data.resolve_data_config({}, model=model)  # input size, mean/std, crop

and, uploaded unchanged to the Hugging Face Hub, as ``timm.create_model("hf-hub:USER/REPO",
pretrained=True)``. ``config.json`` holds timm's ``architecture`` (the timm model name, no
pretrained tag), ``num_classes`` (0: a backbone), ``num_features``, ``model_args`` (every
``create_model`` argument that rebuilds the network: patch and image size, width, depth, heads,
tokens, pooling...) and a ``pretrained_cfg`` of its own: input size from the model, the
normalisation and eval crop the backbone was trained and evaluated with, no ``hf_hub_id`` or tag
of another model. ``config["ssl_vit"]`` keeps the ``create_backbone`` name and kwargs, so that
``ssl_vit.load_backbone(DIR)`` rebuilds the exact ssl_vit backbone.

What timm cannot reproduce: a backbone trained with ``pos_embed_resample="dino"`` (ssl_vit's DINO)
resamples its position embedding for other input sizes with the DINO reference's
``interpolate_pos_encoding``; timm has only its own resampling. At the exported input size the
two are the same model (checked on every export); at other sizes timm's features differ slightly
from ``ssl_vit.load_backbone(DIR)``'s, and ``pretrained_cfg["notes"]`` says so. A fixed sin-cos
position embedding (MAE) is exported as its values; timm makes it trainable.
"""
import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import timm
import torch
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import PretrainedCfg, save_for_hf, split_model_name_tag
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ssl_vit.checkpoints.arch import infer_arch
from ssl_vit.checkpoints.io import PathLike
from ssl_vit.checkpoints.load import CONFIG_NAME, WEIGHTS_NAME, read_backbone
from ssl_vit.models.backbone import resolve_arch
from ssl_vit.models.pos_embed import pos_embed_resample

# create_backbone arguments that are not timm architecture kwargs as such (read off the model instead).
_OWN_KWARGS = ("pos_embed", "global_pool", "drop_path_rate", "dynamic_img_size", "img_size", "pos_embed_resample")
# The preprocessing ssl_vit evaluates with by default (``ssl_vit.data.EvalTransform``): ImageNet
# statistics, bicubic resize to ``size / crop_pct``, centre crop. Runs on other data give theirs.
DATA_DEFAULTS: Dict[str, Any] = dict(
    mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD), interpolation="bicubic", crop_pct=DEFAULT_CROP_PCT
)
_DINO_NOTE = (
    "ssl_vit pos_embed_resample='dino': at input sizes other than input_size, the position embedding "
    "was resampled with the DINO reference's interpolate_pos_encoding; timm resamples it its own way, "
    "so features there differ slightly (ssl_vit.load_backbone(dir) reproduces the original)"
)
_SINCOS_NOTE = "fixed 2-D sin-cos position embedding (MAE), stored as values; timm makes it trainable"


def timm_config(model: VisionTransformer, arch: str, kwargs: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """The timm model name (no pretrained tag) and ``timm.create_model`` kwargs that rebuild ``model``.

    Args:
        model: the backbone (image size, pooling and dynamic size are read off it).
        arch: its ``create_backbone`` name.
        kwargs: its ``create_backbone`` kwargs.
    """
    name, timm_kwargs = resolve_arch(arch, **{k: v for k, v in kwargs.items() if k not in _OWN_KWARGS})
    timm_kwargs.update(
        img_size=list(model.patch_embed.img_size),
        global_pool=model.global_pool,
        dynamic_img_size=bool(model.dynamic_img_size),
        num_classes=0,
    )
    if model.pos_embed is None:
        timm_kwargs["pos_embed"] = "none"
    try:
        json.dumps(timm_kwargs)
    except TypeError as err:
        raise ValueError(f"backbone kwargs {timm_kwargs} cannot be written to {CONFIG_NAME}: {err}") from err
    return split_model_name_tag(name)[0], timm_kwargs


def describe_backbone(model: VisionTransformer) -> Tuple[str, Dict[str, Any]]:
    """``create_backbone`` name and kwargs of a backbone object, read off its weights and attributes
    (for models given without ``arch``; the export check catches anything this misses)."""
    arch, kwargs = infer_arch(model.state_dict(), num_heads=model.blocks[0].attn.num_heads if len(model.blocks) else 1)
    kwargs.update(img_size=list(model.patch_embed.img_size), global_pool=model.global_pool)
    kwargs.pop("no_embed_class", None)
    if model.no_embed_class:
        kwargs["no_embed_class"] = True
    return arch, kwargs


def export_pretrained_cfg(model: VisionTransformer, name: str, data: Mapping[str, Any]) -> Dict[str, Any]:
    """timm's ``pretrained_cfg`` of the exported backbone: its own input size and preprocessing, no
    weight source (``local-dir:`` / ``hf-hub:`` supply it when loading)."""
    notes = []
    if pos_embed_resample(model) == "dino":
        notes.append(_DINO_NOTE)
    if model.pos_embed is not None and not model.pos_embed.requires_grad:
        notes.append(_SINCOS_NOTE)
    return PretrainedCfg(
        architecture=name,
        input_size=(model.patch_embed.proj.in_channels, *model.patch_embed.img_size),
        fixed_input_size=not model.dynamic_img_size,
        interpolation=data["interpolation"],
        crop_pct=float(data["crop_pct"]),
        mean=tuple(float(m) for m in data["mean"]),
        std=tuple(float(s) for s in data["std"]),
        num_classes=0,
        first_conv="patch_embed.proj",
        classifier="head",
        notes=tuple(notes) or None,
    ).to_dict()


def _data_config(data_config: Optional[Mapping[str, Any]], in_chans: int) -> Dict[str, Any]:
    unknown = sorted(set(data_config or {}) - set(DATA_DEFAULTS))
    if unknown:
        raise ValueError(f"data_config keys {unknown} are not known; give any of {sorted(DATA_DEFAULTS)}")
    data = {**DATA_DEFAULTS, **(data_config or {})}
    for key in ("mean", "std"):
        if len(data[key]) != in_chans:
            raise ValueError(f"data_config {key} has {len(data[key])} values for a {in_chans}-channel backbone")
    if min(data["std"]) <= 0 or not 0 < data["crop_pct"] <= 1:
        raise ValueError(f"data_config needs std > 0 and 0 < crop_pct <= 1, got std={data['std']}, crop_pct={data['crop_pct']}")
    return data


def export_backbone(
    model_or_path: Union[nn.Module, PathLike],
    output_dir: PathLike,
    arch: Optional[str] = None,
    role: Optional[str] = None,
    check: bool = True,
    data_config: Optional[Mapping[str, Any]] = None,
    **kwargs: Any,
) -> Path:
    """Write ``output_dir/model.safetensors`` and ``output_dir/config.json`` in timm's format.

    Args:
        model_or_path: a timm ``VisionTransformer`` or any file ``load_backbone`` reads.
        output_dir: created if needed; existing export files are overwritten.
        arch: ``create_backbone`` name (for a path: as ``load_backbone``; for a model: read off the
            model when None).
        role: backbone role for multi-backbone files (DINO ``teacher`` / ``student``).
        check: load the export back with ``timm.create_model("local-dir:...")`` and compare outputs
            on a random batch; raise if they differ.
        data_config: the preprocessing recorded for users of the export: ``mean``, ``std``,
            ``interpolation``, ``crop_pct`` (defaults: :data:`DATA_DEFAULTS`, ssl_vit's own).
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
    data = _data_config(data_config, model.patch_embed.proj.in_channels)
    name, timm_kwargs = timm_config(model, arch, kwargs)
    backbone_kwargs = {k: v for k, v in kwargs.items() if k != "drop_path_rate"}
    if pos_embed_resample(model) != "timm":
        backbone_kwargs["pos_embed_resample"] = pos_embed_resample(model)
    # timm writes the model's pretrained_cfg: give it this export's on a shallow copy (the copy shares
    # the weights; the caller's model keeps its own cfg)
    described = copy.copy(model)
    described.pretrained_cfg = export_pretrained_cfg(model, name, data)
    output_dir = Path(output_dir)
    save_for_hf(
        described,
        str(output_dir),
        model_args=timm_kwargs,
        safe_serialization=True,
        data_config={"input_size": described.pretrained_cfg["input_size"], **data},
        model_config={"ssl_vit": {"arch": arch, "backbone_kwargs": backbone_kwargs, "source": str(source)}},
    )
    readable_by_all(output_dir / WEIGHTS_NAME)  # safetensors creates it 0600, unlike every other file
    if check:
        verify_export(model, output_dir)
    return output_dir


def load_exported(output_dir: PathLike) -> VisionTransformer:
    """Load an export directory exactly as a timm user would (``timm.create_model``, no ssl_vit)."""
    return timm.create_model(f"local-dir:{output_dir}", pretrained=True).eval()


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
            f"export check failed: timm.create_model('local-dir:{output_dir}') does not reproduce the backbone "
            f"(max abs difference {diff}); the model_args in {CONFIG_NAME} are incomplete"
        )


def export_summary(output_dir: PathLike) -> List[str]:
    """Lines telling a user what an export holds and how to load it (printed by the export tool)."""
    output_dir = Path(output_dir)
    config = json.loads((output_dir / CONFIG_NAME).read_text())
    cfg = config["pretrained_cfg"]
    lines = [
        f"wrote {output_dir / WEIGHTS_NAME}",
        f"wrote {output_dir / CONFIG_NAME}: {config['architecture']}, {config['num_features']} features, "
        f"input {tuple(cfg['input_size'])}, mean {tuple(cfg['mean'])}, std {tuple(cfg['std'])}",
        "load it with timm alone:",
        f'  model = timm.create_model("local-dir:{output_dir}", pretrained=True)',
    ]
    return lines + [f"note: {note}" for note in cfg.get("notes") or ()]


def readable_by_all(path: Path) -> None:
    """Give ``path`` the permissions a plain ``open(path, "w")`` would (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
