"""facebookresearch/dino ``MultiCropWrapper`` state dicts <-> the ssl_vit ``DINO`` module.

The reference student and teacher are ``MultiCropWrapper(backbone, DINOHead)``; their keys are
``backbone.*`` (timm ViT layout), ``head.mlp.*`` and the last layer under the old
``torch.nn.utils.weight_norm`` names. A DDP-wrapped student adds ``module.``. ssl_vit's ``DINO`` holds
``student.*``, ``teacher.*`` and the loss centre ``loss.center``; its last layer uses
``torch.nn.utils.parametrizations.weight_norm``::

    reference                        ssl_vit (under student. / teacher.)
    backbone.X                       backbone.X
    head.mlp.N.*                     head.mlp.N.*
    head.last_layer.weight_g [K, 1]  head.last_layer.parametrizations.weight.original0
    head.last_layer.weight_v [K, d]  head.last_layer.parametrizations.weight.original1

A released full training checkpoint (``{"student", "teacher", "dino_loss": {"center"}, ...}``) thus
loads into ``DINO`` to continue training: ``DINO.load_state_dict(dino_reference_to_ssl_vit(...))``.
"""
from typing import Dict, Mapping, Optional

from torch import Tensor

from ssl_vit.checkpoints.io import PathLike, safe_torch_load

_WEIGHT_NORM = {
    "head.last_layer.weight_g": "head.last_layer.parametrizations.weight.original0",
    "head.last_layer.weight_v": "head.last_layer.parametrizations.weight.original1",
}


def reference_to_ssl_vit_key(key: str) -> str:
    """One ``MultiCropWrapper`` key (``module.`` prefix allowed) -> the key under ``student.`` / ``teacher.``."""
    if key.startswith("module."):
        key = key[len("module."):]
    if key in _WEIGHT_NORM:
        return _WEIGHT_NORM[key]
    if not key.startswith(("backbone.", "head.")):
        raise KeyError(f"{key!r} is not a DINO MultiCropWrapper key (backbone.* or head.*)")
    return key


def ssl_vit_to_reference_key(key: str) -> str:
    """Inverse of :func:`reference_to_ssl_vit_key` for a key without the ``student.`` / ``teacher.`` prefix."""
    for old, new in _WEIGHT_NORM.items():
        if key == new:
            return old
    if not key.startswith(("backbone.", "head.")):
        raise KeyError(f"{key!r} is not a DINO network key (backbone.* or head.*)")
    return key


def dino_reference_to_ssl_vit(
    student: Mapping[str, Tensor], teacher: Mapping[str, Tensor], center: Optional[Tensor] = None
) -> Dict[str, Tensor]:
    """A ``DINO`` state dict from reference student / teacher state dicts (and the loss centre).

    Tensors are cloned: the reference's teacher and student may share storage.

    Args:
        student: reference student (``MultiCropWrapper``, optionally DDP ``module.``-prefixed).
        teacher: reference teacher.
        center: ``[1, K]`` the ``DINOLoss`` centre; zeros (the reference's start) when None.
    """
    state: Dict[str, Tensor] = {}
    for prefix, net in (("student.", student), ("teacher.", teacher)):
        for key, value in net.items():
            state[prefix + reference_to_ssl_vit_key(key)] = value.detach().clone()
    if center is None:
        width = state["teacher." + _WEIGHT_NORM["head.last_layer.weight_v"]].shape[0]
        center = next(iter(state.values())).new_zeros(1, width)
    state["loss.center"] = center.detach().clone().reshape(1, -1)
    return state


def ssl_vit_to_dino_reference(state: Mapping[str, Tensor], role: str = "teacher") -> Dict[str, Tensor]:
    """The reference ``MultiCropWrapper`` state dict of one role (``"student"`` or ``"teacher"``)."""
    if role not in ("student", "teacher"):
        raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
    prefix = role + "."
    return {ssl_vit_to_reference_key(k[len(prefix):]): v for k, v in state.items() if k.startswith(prefix)}


LINEAR_HEAD_KEYS = ("linear.weight", "linear.bias")


def read_linear_head(path: PathLike) -> Dict[str, Tensor]:
    """A released DINO linear head (``eval_linear.py``'s checkpoint: ``{"state_dict": {"module.linear.weight",
    "module.linear.bias"}, ...}``, or its state dict alone; ``module.`` optional) as ``{"weight": [C, F],
    "bias": [C]}`` for ``LinearProbe(protocol="dino", head_weights=...)``.

    Its input is the reference feature layout: ``feature="cls"`` with the ``n_last_blocks`` it was trained
    with (ViT-S: 4), or ``feature="cls_avg"`` (ViT-B: CLS and mean interleaved per channel).
    """
    obj = safe_torch_load(path)
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} is not a DINO linear head checkpoint (no state dict)")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if set(state) != set(LINEAR_HEAD_KEYS):
        raise KeyError(f"{path} is not a DINO linear head: expected keys {list(LINEAR_HEAD_KEYS)}, found {sorted(state)[:10]}")
    weight, bias = state["linear.weight"], state["linear.bias"]
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(f"{path}: linear head shapes {tuple(weight.shape)} / {tuple(bias.shape)} do not form a Linear")
    return {"weight": weight, "bias": bias}
