"""One loader for every ViT backbone file ssl_vit meets: ``load_backbone(path, arch=None, role=None, **kwargs)``.

Formats, recognised by their layout (never by file name):

* ssl_vit Lightning checkpoints: ``checkpoint["ssl_vit"]`` names the ``create_backbone`` arch and
  kwargs and the state-dict prefix of each backbone role (MAE ``encoder.vit.``, DINO
  ``teacher.backbone.`` by default or ``student.backbone.``, probe / finetune ``backbone.``).
* timm's own format, as ``timm.models.save_for_hf`` / ``push_to_hf_hub`` write it and
  ``timm.create_model("local-dir:DIR")`` reads it: a directory (or its weights file) with
  ``config.json`` (``architecture``, ``model_args``) beside ``model.safetensors`` or
  ``pytorch_model.bin``. ssl_vit's exports (:mod:`ssl_vit.checkpoints.timm_export`) are such
  directories, with the ``create_backbone`` name and kwargs under ``config["ssl_vit"]``.
* facebookresearch/dino backbone files (a plain timm-layout state dict) and training checkpoints
  (``student`` / ``teacher`` / ``args`` ...): the teacher backbone unless ``role="student"``.
* facebookresearch/mae checkpoints ``{"model": ...}``: pretraining ones (``mask_token`` and
  ``decoder_*`` dropped) and finetuned ones (``head.*`` dropped; ``fc_norm.*`` means average pooling).
* plain timm state dicts, bare or under ``"state_dict"`` / ``"model"`` (a classifier ``head.*`` is dropped).

Where the file does not name the architecture and ``arch`` is None, it is inferred from tensor
shapes (width, depth, patch size, image size from ``pos_embed``; heads from the ViT table). Where
it names one and ``arch`` gives another name, the two are compared as architectures
(:mod:`ssl_vit.checkpoints.arch`), not as names. Every load checks keys and shapes exactly and
fails naming the missing and unexpected keys.
"""
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ssl_vit.checkpoints.arch import architecture_differences, architecture_of, infer_arch, pos_embed_kwargs
from ssl_vit.checkpoints.format import CHECKPOINT_KEY
from ssl_vit.checkpoints.io import (
    PathLike, check_keys, check_shapes, is_safetensors, read_json_object, read_safetensors, safe_torch_load,
)
from ssl_vit.models.backbone import create_backbone
from ssl_vit.models.pos_embed import fit_position_state
from ssl_vit.models.rel_pos import fit_rel_pos_state

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
# The weights files of timm's format, in the order timm prefers them (save_for_hf writes the first,
# the second with safe_serialization=False, both with "both").
WEIGHTS_NAMES = (WEIGHTS_NAME, "pytorch_model.bin")
LOCAL_DIR = "local-dir:"  # timm's prefix for a directory in its format

FORMATS = (
    "load_backbone knows: ssl_vit Lightning checkpoints (checkpoint['ssl_vit']); timm-format "
    "directories (config.json + model.safetensors or pytorch_model.bin: ssl_vit exports, timm save_for_hf, "
    "local-dir:DIR); facebookresearch/dino backbones and training checkpoints "
    "(student/teacher/args); facebookresearch/mae checkpoints ({'model': ...}, pretraining or "
    "finetuned); plain timm state dicts (bare, or under 'state_dict' / 'model')."
)

# Reference DINO `args.arch` -> ssl_vit size (the patch size comes from `args.patch_size`).
_DINO_ARCHS = {"vit_tiny": "tiny", "vit_small": "small", "vit_base": "base"}


class LoadedBackbone(NamedTuple):
    """A loaded backbone and how to rebuild it: ``create_backbone(arch, **kwargs)``."""
    model: VisionTransformer
    arch: str
    kwargs: Dict[str, Any]
    source: str  # the format that was recognised, e.g. "ssl_vit checkpoint (mae, role encoder)"


class _Found(NamedTuple):
    state: Dict[str, Tensor]  # backbone weights in timm layout
    arch: Optional[str]  # create_backbone name, when the file says it
    kwargs: Dict[str, Any]  # create_backbone kwargs the file says
    source: str
    complete: bool = False  # kwargs fully describe the architecture (no shape inference needed)


def load_backbone(
    path: PathLike, arch: Optional[str] = None, role: Optional[str] = None, **kwargs: Any
) -> VisionTransformer:
    """Load the timm ``VisionTransformer`` (no classifier) stored in ``path``, in any known format.

    Args:
        path: checkpoint file, a timm-format directory (``DIR`` or ``local-dir:DIR``) or its
            weights file.
        arch: ``create_backbone`` / timm name, for files that do not name their architecture
            (inferred from tensor shapes when None). For files that do, a check: another name is
            accepted if it builds the same architecture, and refused naming each differing field.
        role: which backbone of a multi-backbone file: ``"teacher"`` (DINO default) or
            ``"student"``; roles of ssl_vit checkpoints are listed in their metadata.
        **kwargs: ``create_backbone`` arguments overriding the file's (``img_size`` resamples the
            position embedding; ``global_pool``, ``drop_path_rate``, ``dynamic_img_size`` ...).

    Returns:
        The backbone in eval mode; ``model(images)`` gives the pooled feature ``[B, D]``.
    """
    return read_backbone(path, arch, role, **kwargs).model


def read_backbone(
    path: PathLike, arch: Optional[str] = None, role: Optional[str] = None, **kwargs: Any
) -> LoadedBackbone:
    """``load_backbone`` that also returns the ``create_backbone`` name and kwargs it used."""
    path = Path(str(path)[len(LOCAL_DIR):]) if str(path).startswith(LOCAL_DIR) else Path(path)
    found = _read(path, role)
    if arch is not None and found.arch is not None and arch != found.arch:
        _check_same_architecture(path, found, arch, kwargs)
    state = dict(found.state)
    build_kwargs = dict(found.kwargs)
    inferred = ""
    if found.arch is None and arch is None:
        arch, shape_kwargs = infer_arch(state, num_heads=kwargs.get("num_heads"))
        build_kwargs.update(shape_kwargs)
        inferred = f" (inferred from tensor shapes: {arch} {shape_kwargs})"
    else:
        arch = found.arch or arch
        if not found.complete:
            build_kwargs = {**pos_embed_kwargs(state), **build_kwargs}
    if "fc_norm.weight" in state and "norm.weight" not in state and "global_pool" not in build_kwargs:
        build_kwargs["global_pool"] = "avg"  # MAE finetuned / timm avg-pool checkpoints
    build_kwargs.update(kwargs)
    what = f"{path} [{found.source}] into {arch} {build_kwargs}{inferred}"
    try:
        model = create_backbone(arch, **build_kwargs)
    except Exception as err:
        raise ValueError(f"cannot build the backbone for {what}: {err}") from err
    state = _adapt_pooling(state, model)
    state = fit_rel_pos_state(fit_position_state(state, model), model)  # to the model's grid
    expected = model.state_dict()
    check_keys(expected, state, what, FORMATS)
    check_shapes(expected, state, what)
    model.load_state_dict(state, strict=True)
    return LoadedBackbone(model.eval(), arch, _recorded_kwargs(build_kwargs), found.source)


def _check_same_architecture(path: Path, found: "_Found", arch: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse ``arch`` unless it builds the architecture the file names (its name and kwargs, with the
    caller's ``kwargs`` applied to both), naming each field that differs with both values."""
    try:
        in_file = architecture_of(found.arch, {**found.kwargs, **kwargs})
        asked = architecture_of(arch, kwargs)
    except Exception as err:  # create_backbone / timm reject a name or an argument
        raise ValueError(f"{path} is a {found.arch} backbone ({found.source}); arch={arch!r} cannot be compared: {err}") from err
    differences = architecture_differences(in_file, asked)
    if differences:
        raise ValueError(
            f"{path} is a {found.arch} backbone ({found.source}), but arch={arch!r} was asked for, another "
            "architecture:\n  " + "\n  ".join(differences)
        )


# -- formats ----------------------------------------------------------------------------------------
def _read(path: Path, role: Optional[str]) -> _Found:
    if (path.is_dir() or path.suffix == ".safetensors" or (path.is_file() and is_safetensors(path))
            or (path.name in WEIGHTS_NAMES and (path.parent / CONFIG_NAME).is_file())):
        return _read_timm_format(path, role)
    obj = safe_torch_load(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict. {FORMATS}")
    if CHECKPOINT_KEY in obj:
        return _read_ssl_vit(path, obj, role)
    if "teacher" in obj and "student" in obj:
        return _read_dino_training(path, obj, role)
    _no_roles(path, role, "a single-backbone file")
    for wrapper in ("model", "state_dict"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            return _read_state_dict(path, obj[wrapper], f"{{'{wrapper}': state dict}}")
    return _read_state_dict(path, obj, "state dict")


def _no_roles(path: Path, role: Optional[str], what: str) -> None:
    if role is not None:
        raise ValueError(f"{path} is {what}: it has no backbone roles, but role={role!r} was asked for")


def _strip(state: Mapping[str, Any], prefix: str) -> Dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _read_ssl_vit(path: Path, obj: Mapping, role: Optional[str]) -> _Found:
    meta = obj[CHECKPOINT_KEY]
    roles = meta["backbones"]
    role = meta["default"] if role is None else role
    if role not in roles:
        raise ValueError(f"{path} has backbone roles {sorted(roles)}, not {role!r}")
    if "state_dict" not in obj:
        raise ValueError(f"{path} carries ssl_vit metadata but no 'state_dict'")
    state = _strip(obj["state_dict"], roles[role])
    if not state:
        raise KeyError(f"{path}: no key starts with {roles[role]!r} (role {role!r}) in its state_dict")
    return _Found(state, meta["arch"], dict(meta["backbone_kwargs"]), f"ssl_vit checkpoint ({meta.get('method')}, role {role})", True)


def _read_timm_format(path: Path, role: Optional[str]) -> _Found:
    """A timm-format directory or its weights file; a ``.safetensors`` file with no ``config.json``
    beside it is a bare state dict (its architecture inferred)."""
    _no_roles(path, role, "a timm-format backbone")
    if path.is_dir():
        weights = next((path / name for name in WEIGHTS_NAMES if (path / name).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{path} holds no weights: expected {' or '.join(WEIGHTS_NAMES)} (timm's format)")
    elif path.is_file():
        weights = path
    else:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = _read_weights(weights)
    config_path = weights.parent / CONFIG_NAME
    if not config_path.is_file():
        return _read_state_dict(weights, state, f"{weights.suffix} state dict, no {CONFIG_NAME} beside it")
    config = read_json_object(config_path)
    if "ssl_vit" in config:
        meta = config["ssl_vit"]
        if not isinstance(meta, dict) or "arch" not in meta or not isinstance(meta.get("backbone_kwargs"), dict):
            raise ValueError(f"{config_path}: its 'ssl_vit' entry needs 'arch' and 'backbone_kwargs', got {meta!r}")
        return _Found(state, meta["arch"], dict(meta["backbone_kwargs"]), f"ssl_vit export ({weights.name})", True)
    if not isinstance(config.get("architecture"), str):
        raise KeyError(f"{config_path} names no 'architecture' (timm's config.json) and carries no 'ssl_vit' entry")
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise ValueError(f"{config_path}: 'model_args' must be an object, got {model_args!r}")
    model_args = dict(model_args)
    source = f"timm format ({weights.name})"
    if model_args.pop("num_classes", config.get("num_classes", 0)):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        source += ", classifier dropped"
    # without model_args (timm's older single-dict configs) the image size comes from pos_embed
    return _Found(state, config["architecture"], model_args, source, bool(model_args))


def _read_weights(weights: Path) -> Dict[str, Tensor]:
    """The state dict in a ``.safetensors`` file or a weights-only torch file."""
    if weights.suffix == ".safetensors" or is_safetensors(weights):
        return read_safetensors(weights)
    state = safe_torch_load(weights)
    if not isinstance(state, Mapping):
        raise ValueError(f"{weights} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def _read_dino_training(path: Path, obj: Mapping, role: Optional[str]) -> _Found:
    role = "teacher" if role is None else role
    if role not in ("teacher", "student"):
        raise ValueError(f"{path} is a DINO training checkpoint: role must be 'teacher' or 'student', got {role!r}")
    net = obj[role]
    if any(k.startswith("module.") for k in net):  # DDP-wrapped student (and, elsewhere, teacher)
        net = _strip(net, "module.")
    state = _strip(net, "backbone.")
    if not state:
        raise KeyError(f"{path}: DINO {role} has no 'backbone.' keys (found e.g. {sorted(net)[:5]})")
    arch = None
    args = obj.get("args")
    if args is not None and getattr(args, "arch", None) is not None:
        if args.arch not in _DINO_ARCHS:
            raise ValueError(f"{path}: DINO arch {args.arch!r} is not a ViT ssl_vit knows ({sorted(_DINO_ARCHS)})")
        arch = f"vit_{_DINO_ARCHS[args.arch]}_patch{int(args.patch_size)}"
    # trained with the reference interpolate_pos_encoding: evaluate other resolutions the same way
    return _Found(state, arch, {"pos_embed_resample": "dino"}, f"DINO training checkpoint ({role})")


def _read_state_dict(path: Path, state: Mapping[str, Any], wrapper: str) -> _Found:
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path} ({wrapper}) is not a state dict: non-tensor entries {bad[:10]}. {FORMATS}")
    prefixes = sorted({k[: -len("patch_embed.proj.weight")] for k in state if k.endswith("patch_embed.proj.weight")})
    if len(prefixes) != 1:
        raise KeyError(
            f"{path} ({wrapper}): expected one ViT (one '*patch_embed.proj.weight' key), found "
            f"prefixes {prefixes}. {FORMATS}"
        )
    state = _strip(state, prefixes[0])
    source = wrapper if not prefixes[0] else f"{wrapper}, prefix {prefixes[0]!r}"
    if "mask_token" in state or any(k.startswith("decoder_") for k in state):
        source = f"MAE pretraining checkpoint ({source})"
        state = {k: v for k, v in state.items() if k != "mask_token" and not k.startswith("decoder_")}
    if any(k.startswith("head.") for k in state):
        source = f"classifier checkpoint ({source}), head dropped"
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return _Found(state, None, {}, source)


# -- state adaptation -------------------------------------------------------------------------------
def _adapt_pooling(state: Dict[str, Tensor], model: VisionTransformer) -> Dict[str, Tensor]:
    """Token-pooled weights into an average-pooled model (MAE finetuning): the final ``norm`` is
    dropped and ``fc_norm`` keeps its fresh init, as facebookresearch/mae's finetuning does. The
    only difference allowed is exactly ``norm.*`` in the file vs ``fc_norm.*`` in the model."""
    expected = model.state_dict()
    file_norm = sorted(k for k in state if k.startswith("norm."))
    if file_norm and not any(k.startswith("norm.") for k in expected) and not any(k.startswith("fc_norm.") for k in state):
        fc = {k for k in expected if k.startswith("fc_norm.")}
        if fc and {k.replace("norm.", "fc_norm.", 1) for k in file_norm} == fc:
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
            state.update({k: v.clone() for k, v in expected.items() if k in fc})
    return state


def _recorded_kwargs(kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """The kwargs to record in checkpoint metadata: architecture only (drop path is training-time)."""
    return {k: v for k, v in kwargs.items() if k != "drop_path_rate"}



# -- building a backbone from a file or from scratch -----------------------------------------------
def build_frozen_backbone(
    weights: Optional[str], arch: Optional[str], role: Optional[str], backbone_kwargs: Optional[Dict[str, Any]]
) -> Tuple[VisionTransformer, str, Dict[str, Any]]:
    """A backbone in eval mode with gradients off, from ``weights`` (any format) or random (``arch``)."""
    model, arch, kwargs = build_backbone(weights, arch, role, backbone_kwargs)
    model.eval().requires_grad_(False)
    return model, arch, kwargs


def build_backbone(
    weights: Optional[str], arch: Optional[str], role: Optional[str], backbone_kwargs: Optional[Dict[str, Any]]
) -> Tuple[VisionTransformer, str, Dict[str, Any]]:
    """``(model, arch, kwargs)`` from ``weights`` via ``read_backbone``, or ``create_backbone(arch)``."""
    kwargs = dict(backbone_kwargs or {})
    if weights is not None:
        loaded = read_backbone(weights, arch, role, **kwargs)
        return loaded.model, loaded.arch, loaded.kwargs
    if arch is None:
        raise ValueError("give `weights` (a backbone file) or `arch` (for a randomly initialised backbone)")
    if role is not None:
        raise ValueError(f"role={role!r} needs `weights`")
    return create_backbone(arch, **kwargs), arch, {k: v for k, v in kwargs.items() if k != "drop_path_rate"}


__all__: List[str] = ["load_backbone", "read_backbone", "infer_arch", "LoadedBackbone", "FORMATS"]
