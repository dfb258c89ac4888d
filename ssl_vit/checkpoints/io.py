"""Safe checkpoint reading and exact key checks, shared by every loader.

No loader here ever unpickles arbitrary objects: ``torch.load`` always runs with
``weights_only=True``; ``argparse.Namespace`` is allow-listed because the reference DINO training
checkpoints store their arguments as one.

Before anything is unpickled, :func:`check_checkpoint_file` looks at the file and names what is wrong
with it, one message per kind: missing, empty, truncated (a zip archive without its end), not a torch
file at all, a safetensors export given where a checkpoint was expected, or pickled objects that a
weights-only load refuses (named, read statically from the pickle: nothing runs). Every loader
(``safe_torch_load``) and ``ssl-vit fit --ckpt_path`` (before Lightning opens the file) use it.
Exports are read through :func:`read_safetensors` and :func:`read_json_object`, whose errors name
the file.
"""
import argparse
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Sequence, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

PathLike = Union[str, Path]

# Objects a weights-only load of ssl_vit's readers accepts beyond torch's own allow-list.
ALLOWED_GLOBALS = (argparse.Namespace,)
EXPORT_HINT = (
    "an exported backbone (weights only): read it with ssl_vit.checkpoints.load_backbone, or give it to the "
    "probe, finetune or k-NN stage as `weights` (--model.init_args.weights); it cannot resume a training run"
)
_ZIP_MAGIC, _PICKLE_PROTO = b"PK\x03\x04", b"\x80"


def is_safetensors(path: PathLike) -> bool:
    """Whether ``path`` starts like a safetensors file: an 8-byte little-endian header length that
    fits in the file, then a JSON header (``{``)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    return head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size


def check_checkpoint_file(path: PathLike, allowed: Sequence[type] = ALLOWED_GLOBALS) -> Path:
    """Raise one clear error naming ``path`` and the problem unless ``torch.load(path,
    weights_only=True)`` can read it; nothing is unpickled (the pickle's globals are read statically).

    Args:
        path: a checkpoint file (``torch.save`` / Lightning).
        allowed: pickled classes accepted besides torch's weights-only allow-list.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a folder, an empty, truncated or foreign file, a safetensors export, or a
            pickle needing objects a weights-only load refuses.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            raise ValueError(f"{path} is not a checkpoint but {EXPORT_HINT}")
        raise ValueError(f"{path} is a folder, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes), not a checkpoint: a save or copy that never completed?")
    if is_safetensors(path):
        raise ValueError(f"{path} is a safetensors file, not a checkpoint: {EXPORT_HINT}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_PICKLE_PROTO):
        return path  # torch's legacy (pre-1.6) format: a bare pickle; torch.load's weights-only unpickler judges it
    if head != _ZIP_MAGIC:
        raise ValueError(f"{path} is not a torch checkpoint: it starts with {head!r}, neither a zip archive (what "
                         "torch.save writes) nor a pickle")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is truncated or damaged ({size} bytes): a zip archive (what torch.save writes) "
                         "without its end (central directory); a save or copy that was cut short?")
    with zipfile.ZipFile(path) as archive:
        if not any(name.endswith("data.pkl") for name in archive.namelist()):
            raise ValueError(f"{path} is a zip archive but not a torch checkpoint (it holds no data.pkl)")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, pickle.UnpicklingError) as err:  # TorchScript archives, a damaged data.pkl
        raise ValueError(f"{path} cannot be read as a torch checkpoint: {err}") from None
    if unsafe:
        raise ValueError(
            f"{path} cannot be read as a weights-only checkpoint: it holds pickled objects other than tensors and "
            f"plain containers ({', '.join(sorted(unsafe)[:8])}). ssl_vit never unpickles those, as they can run code; "
            "only a file from a source you trust could be converted, outside ssl_vit"
        )
    return path


def safe_torch_load(path: PathLike) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)`` with ``argparse.Namespace``
    allowed, after :func:`check_checkpoint_file`. A file that needs any other pickled object, or is
    damaged, is refused with a clear error."""
    path = check_checkpoint_file(path)
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # (not torch's text: it suggests weights_only=False, i.e. running whatever the file holds)
        raise ValueError(
            f"{path} cannot be read as a weights-only checkpoint: its pickle needs objects other than tensors and "
            "plain containers, which ssl_vit never unpickles, as they can run code"
        ) from None
    except Exception as err:  # torch raises RuntimeError or zip errors for damaged members
        raise ValueError(f"{path} cannot be read as a weights-only checkpoint: it is damaged ({err})") from err


def read_safetensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, empty or corrupt file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} cannot be read as a safetensors file ({path.stat().st_size} bytes; truncated or "
                         f"not safetensors?): {err}") from err


def read_json_object(path: PathLike) -> Dict[str, Any]:
    """The JSON object (a dict) in ``path``; invalid JSON or another type is an error naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} cannot be read as JSON: {err.msg} at line {err.lineno}, column {err.colno}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} cannot be read as JSON: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise ValueError(f"{path} cannot be read as JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


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
