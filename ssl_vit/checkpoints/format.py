"""The ssl_vit checkpoint convention: the metadata entry every Lightning checkpoint of a stage carries,
so that ``load_backbone`` can rebuild its backbone(s) with no other information."""
from functools import reduce
from typing import Callable, Dict, Union

from torch import nn

# Every ssl_vit Lightning checkpoint carries this entry, so that `load_backbone` can rebuild the
# backbone with no other information: {"method", "arch", "backbone_kwargs", "backbones", "default"}.
CHECKPOINT_KEY = "ssl_vit"


def backbone_metadata(
    method: str, arch: str, backbone_kwargs: Dict, backbones: Dict[str, str], default: str
) -> Dict:
    """The ``checkpoint["ssl_vit"]`` entry.

    Args:
        method: ``"mae"``, ``"dino"``, ``"probe"``, ``"finetune"``.
        arch: the ``create_backbone`` name.
        backbone_kwargs: the ``create_backbone`` keyword arguments (``img_size``, ``pos_embed``...).
        backbones: role -> state-dict prefix of that backbone, e.g. ``{"teacher": "teacher.backbone.",
            "student": "student.backbone."}``.
        default: the role ``load_backbone`` returns when none is asked for.
    """
    if default not in backbones:
        raise ValueError(f"default backbone {default!r} is not one of {sorted(backbones)}")
    return {
        "method": method,
        "arch": arch,
        "backbone_kwargs": dict(backbone_kwargs),
        "backbones": dict(backbones),
        "default": default,
    }


# -- where a stage keeps its backbones --------------------------------------------------------------
# Every stage declares them once, as class attributes: ``BACKBONES`` (role -> dotted attribute path,
# e.g. DINO ``{"teacher": "teacher.backbone", "student": "student.backbone"}``) and ``EVAL_BACKBONE``
# (the role evaluation reads). The checkpoint metadata and the callbacks that read a backbone
# (k-NN monitor, attention gallery) both come from there.
def stage_metadata(module: nn.Module, method: str, arch: str, backbone_kwargs: Dict) -> Dict:
    """The ``checkpoint["ssl_vit"]`` entry of a stage, from its declared ``BACKBONES``."""
    roles = {role: path + "." for role, path in module.BACKBONES.items()}
    return backbone_metadata(method, arch, backbone_kwargs, roles, module.EVAL_BACKBONE)


def find_backbone(module: nn.Module, backbone: Union[None, str, Callable[[nn.Module], nn.Module]] = None) -> nn.Module:
    """The backbone a callback reads off ``module``: ``backbone(module)``, the module at the dotted
    attribute path ``backbone``, or (``None`` / ``"auto"``) the one the stage declares for evaluation
    (``module.BACKBONES[module.EVAL_BACKBONE]``: DINO's teacher, MAE's encoder, a probe's backbone)."""
    if callable(backbone):
        return backbone(module)
    if backbone in (None, "auto"):
        roles, role = getattr(module, "BACKBONES", None), getattr(module, "EVAL_BACKBONE", None)
        if not roles or role not in roles:
            raise AttributeError(
                f"{type(module).__name__} declares no evaluation backbone (BACKBONES / EVAL_BACKBONE): "
                "give the backbone's dotted attribute path, e.g. backbone='encoder.vit'"
            )
        backbone = roles[role]
    try:
        found = reduce(getattr, backbone.split("."), module)
    except AttributeError:
        found = None
    if not isinstance(found, nn.Module):
        raise AttributeError(f"{type(module).__name__} has no backbone module at {backbone!r}")
    return found
