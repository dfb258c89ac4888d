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

The design-lab options: a factorised position embedding is exported as the full learned table it
expands to (``no_embed_class=True``: prefix tokens get none), which timm resamples to the same values
at every size (see ``ssl_vit.models.pos_embed``); ``"rope"`` exports as timm's ``Eva`` and
``"rel_bias"`` as ``VisionTransformerRelPos``, with their own ``model_args``. A convolutional stem
cannot be exported: timm rebuilds a model from ``config.json``'s JSON arguments, and no timm ViT takes
that stem by argument; the export refuses it, naming the option.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import timm
import torch
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import PretrainedCfg, save_for_hf, split_model_name_tag
from torch import nn

from ssl_vit.checkpoints.arch import infer_arch
from ssl_vit.checkpoints.io import PathLike
from ssl_vit.checkpoints.load import CONFIG_NAME, WEIGHTS_NAME, read_backbone
from ssl_vit.models.backbone import backbone_options, image_channels, timm_spec
from ssl_vit.models.pos_embed import FACTORIZED, expand_factorized, pos_embed_resample, position_embedding
from ssl_vit.models.rel_pos import BACKBONE_TYPES, fixed_grid

# create_backbone arguments that are not timm architecture kwargs as such (read off the model instead).
_OWN_KWARGS = ("pos_embed", "stem", "global_pool", "drop_path_rate", "dynamic_img_size", "img_size", "pos_embed_resample")
# how each ssl_vit position embedding is built in timm: sincos as its values, factorised as its expansion
_TIMM_POS_EMBED = {"sincos": "learn", "factorized": "learn"}
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


def timm_config(model: nn.Module, arch: str, kwargs: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """The timm model name (no pretrained tag) and ``timm.create_model`` kwargs that rebuild ``model``.

    Args:
        model: the backbone (image size, pooling, dynamic size, position embedding and stem are read off it).
        arch: its ``create_backbone`` name.
        kwargs: its ``create_backbone`` kwargs.

    Raises:
        ValueError: the backbone has an option timm cannot rebuild (``stem="conv"``), naming it.
    """
    options = backbone_options(model)
    if options["stem"] != "patch":
        raise ValueError(
            f"stem={options['stem']!r} cannot be exported to timm's format: timm rebuilds a model from the JSON "
            f"model_args of {CONFIG_NAME}, and no timm ViT takes a convolutional stem by argument. Keep the ssl_vit "
            "checkpoint (ssl_vit.load_backbone reads it at any resolution)"
        )
    pos = options["pos_embed"]
    name, timm_kwargs = timm_spec(
        arch, _TIMM_POS_EMBED.get(pos, pos), model.global_pool, bool(getattr(model, "dynamic_img_size", False)),
        **{k: v for k, v in kwargs.items() if k not in _OWN_KWARGS}, img_size=list(model.patch_embed.img_size),
    )
    timm_kwargs["num_classes"] = 0
    if pos == "factorized":
        timm_kwargs["no_embed_class"] = True
    try:
        json.dumps(timm_kwargs)
    except TypeError as err:
        raise ValueError(f"backbone kwargs {timm_kwargs} cannot be written to {CONFIG_NAME}: {err}") from err
    return split_model_name_tag(name)[0], timm_kwargs


def export_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model``'s weights as the timm model of :func:`timm_config` holds them (a factorised
    embedding as the ``[1, h * w, D]`` table it expands to at the model's own grid)."""
    state = model.state_dict()
    if all(key in state for key in FACTORIZED):
        state["pos_embed"] = expand_factorized(state.pop(FACTORIZED[0]), state.pop(FACTORIZED[1]))
    return state


def describe_backbone(model: nn.Module) -> Tuple[str, Dict[str, Any]]:
    """``create_backbone`` name and kwargs of a backbone object, read off its weights and attributes
    (for models given without ``arch``; the export check catches anything this misses)."""
    arch, kwargs = infer_arch(model.state_dict(), num_heads=model.blocks[0].attn.num_heads if len(model.blocks) else 1)
    kwargs.update(img_size=list(model.patch_embed.img_size), global_pool=model.global_pool, **backbone_options(model))
    kwargs.pop("no_embed_class", None)
    if getattr(model, "no_embed_class", False):
        kwargs["no_embed_class"] = True
    if fixed_grid(model) is not None and kwargs["pos_embed"] != "rel_bias":
        kwargs["dynamic_img_size"] = False
    return arch, kwargs


def export_pretrained_cfg(model: nn.Module, name: str, data: Mapping[str, Any]) -> Dict[str, Any]:
    """timm's ``pretrained_cfg`` of the exported backbone: its own input size and preprocessing, no
    weight source (``local-dir:`` / ``hf-hub:`` supply it when loading)."""
    notes = []
    if pos_embed_resample(model) == "dino" and position_embedding(model, model.patch_embed.grid_size) is not None:
        notes.append(_DINO_NOTE)
    if backbone_options(model)["pos_embed"] == "sincos":
        notes.append(_SINCOS_NOTE)
    return PretrainedCfg(
        architecture=name,
        input_size=(image_channels(model), *model.patch_embed.img_size),
        fixed_input_size=fixed_grid(model) is not None,
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
        if not isinstance(model_or_path, BACKBONE_TYPES):
            raise TypeError(f"export_backbone needs a timm VisionTransformer (or Eva, VisionTransformerRelPos), got "
                            f"{type(model_or_path).__name__}")
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
    data = _data_config(data_config, image_channels(model))
    name, timm_kwargs = timm_config(model, arch, kwargs)
    backbone_kwargs = {k: v for k, v in kwargs.items() if k != "drop_path_rate"}
    if pos_embed_resample(model) != "timm":
        backbone_kwargs["pos_embed_resample"] = pos_embed_resample(model)
    # what timm will build, holding the weights (shared, not copied); timm writes its pretrained_cfg
    with torch.device("meta"):
        described = timm.create_model(name, pretrained=False, **timm_kwargs)
    try:
        described.load_state_dict(export_state(model), strict=True, assign=True)
    except RuntimeError as err:
        raise RuntimeError(f"{source}: its weights do not fit timm's {name} {timm_kwargs}: {err}") from err
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


def load_exported(output_dir: PathLike) -> nn.Module:
    """Load an export directory exactly as a timm user would (``timm.create_model``, no ssl_vit)."""
    return timm.create_model(f"local-dir:{output_dir}", pretrained=True).eval()


@torch.no_grad()
def verify_export(model: nn.Module, output_dir: PathLike, batch: int = 2) -> None:
    """Raise ``RuntimeError`` unless the timm-loaded export gives ``model``'s outputs on random images:
    at the exported size, and, where timm resamples as the model does, at a larger one."""
    exported = load_exported(output_dir)
    was_training = model.training
    model.eval()
    h, w = model.patch_embed.img_size
    sizes = [(h, w)]
    if fixed_grid(model) is None and pos_embed_resample(model) == "timm":
        ph, pw = model.patch_embed.patch_size
        sizes.append((h + 2 * ph, w + 2 * pw))
    try:
        for size in sizes:
            images = torch.randn(batch, image_channels(model), *size, generator=torch.Generator().manual_seed(0))
            device = next(model.parameters()).device
            expected = model(images.to(device)).float().cpu()
            got = exported(images).float()
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                diff = (got - expected).abs().max().item() if got.shape == expected.shape else "shape"
                raise RuntimeError(
                    f"export check failed: timm.create_model('local-dir:{output_dir}') does not reproduce the backbone "
                    f"at {size[0]}x{size[1]} (max abs difference {diff}); the model_args in {CONFIG_NAME} are incomplete"
                )
    finally:
        model.train(was_training)


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
