"""Safe checkpoint reading and exact key checks, shared by every loader.

No loader here ever unpickles arbitrary objects: ``torch.load`` always runs with
``weights_only=True``; ``argparse.Namespace`` is allow-listed because the reference DINO training
checkpoints store their arguments as one.
"""
import argparse
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import torch

PathLike = Union[str, Path]


def safe_torch_load(path: PathLike) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)`` with ``argparse.Namespace``
    allowed. A file that needs any other pickled object is refused with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or zip errors
        raise ValueError(
            f"{path} cannot be read as a weights-only checkpoint (it may hold pickled code, which "
            f"ssl_vit never runs, or be truncated): {err}"
        ) from err


# What of a Lightning checkpoint is the training state (callback states may hold an infinite
# ``ModelCheckpoint.kth_value`` on purpose).
TRAINING_STATE = ("state_dict", "optimizer_states")


def count_non_finite(obj: Any) -> int:
    """Floating tensors holding a NaN or inf in ``obj``: in a Lightning checkpoint its weights and
    optimiser states (``TRAINING_STATE``), in anything else every tensor (dicts, lists, tuples walked)."""
    if isinstance(obj, Mapping) and any(key in obj for key in TRAINING_STATE):
        return sum(count_non_finite(obj[key]) for key in TRAINING_STATE if key in obj)
    if isinstance(obj, torch.Tensor):
        return int(obj.is_floating_point() and not bool(torch.isfinite(obj).all()))
    if isinstance(obj, Mapping):
        return sum(count_non_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(count_non_finite(v) for v in obj)
    return 0


def check_keys(
    expected: Iterable[str], found: Iterable[str], what: str, formats_hint: str = ""
) -> None:
    """Raise ``KeyError`` naming the missing and unexpected keys unless the two sets are equal."""
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        def show(keys: list) -> str:
            return ", ".join(keys[:20]) + (f" ... (+{len(keys) - 20} more)" if len(keys) > 20 else "")

        msg = f"{what}: state dict does not match the model."
        if missing:
            msg += f"\n  missing keys ({len(missing)}): {show(missing)}"
        if unexpected:
            msg += f"\n  unexpected keys ({len(unexpected)}): {show(unexpected)}"
        if formats_hint:
            msg += f"\n{formats_hint}"
        raise KeyError(msg)


def check_shapes(model_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError`` listing every key whose tensor shape differs from the model's."""
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in model_state.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise ValueError(f"{what}: tensor shapes do not match the model:\n  " + "\n  ".join(wrong))
