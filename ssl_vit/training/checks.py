"""Start-up checks: what can be known to be wrong about a run before any compute.

:func:`check_run` runs in the ``StartupChecks`` callback's ``setup`` (``ssl-vit`` always adds it), after
the datamodule's own ``setup`` and before Lightning moves the model, builds the optimiser or iterates
a loader. It checks that every image the stage's transforms produce can be cut into the model's
patches: a transform reports the ``(H, W)`` of its outputs through an ``output_sizes()`` method
(``PretrainTransform``, ``EvalTransform``, ``MultiCropTransform``); a transform without one is not
checked.

:func:`check_resume_file` and :func:`check_resume_config` are for the CLI. The first refuses a
``--ckpt_path`` file that cannot be read, naming the problem, before Lightning opens it. The second:
LightningCLI replaces the recipe's model configuration by the hyperparameters stored in a
``--ckpt_path`` checkpoint, so a checkpoint of another method or architecture would silently replace
the recipe's model; it names every difference instead.
"""
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import pytorch_lightning as pl
from torch import nn

from ssl_vit.checkpoints.io import check_checkpoint_file
from ssl_vit.models.backbone import backbone_options
from ssl_vit.models.rel_pos import BACKBONE_TYPES, fixed_grid

Size = Tuple[int, int]


def view_sizes(transform: Optional[Callable]) -> Optional[List[Size]]:
    """``(H, W)`` of each image ``transform`` returns, or ``None`` when it does not say."""
    report = getattr(transform, "output_sizes", None)
    if not callable(report):
        return None
    return [(int(h), int(w)) for h, w in report()]


def model_patch_sizes(module: nn.Module) -> List[Size]:
    """The distinct ``(ph, pw)`` patch sizes of the timm ViTs inside ``module``."""
    sizes = {tuple(m.patch_embed.patch_size) for m in module.modules() if isinstance(m, BACKBONE_TYPES)}
    return sorted((int(h), int(w)) for h, w in sizes)


def model_fixed_sizes(module: nn.Module) -> List[Tuple[Size, str]]:
    """``((H, W), what)`` of each backbone inside ``module`` that takes one image size only: a relative
    position bias table (``pos_embed="rel_bias"``) or a build without ``dynamic_img_size``."""
    found = {}
    for m in module.modules():
        if isinstance(m, BACKBONE_TYPES) and fixed_grid(m) is not None:
            h, w = m.patch_embed.img_size
            options = backbone_options(m)
            what = ("pos_embed='rel_bias' (a relative bias table fits one patch grid)" if options["pos_embed"] == "rel_bias"
                    else "a backbone built with dynamic_img_size=False")
            found[(int(h), int(w))] = what
    return sorted(found.items())


def check_fixed_sizes(transforms: Mapping[str, Optional[Callable]], fixed: Sequence[Tuple[Size, str]]) -> None:
    """Raise ``ValueError`` naming every transform output a one-size backbone cannot take (DINO's local
    crops with ``pos_embed="rel_bias"``)."""
    problems = []
    for name, transform in transforms.items():
        sizes = view_sizes(transform)
        for index, (h, w) in enumerate(sizes or []):
            for (fh, fw), what in fixed:
                if (h, w) != (fh, fw):
                    view = f" view {index}" if len(sizes) > 1 else ""
                    problems.append(f"{name} ({type(transform).__name__}){view} makes {h}x{w} images, but the model "
                                    f"takes {fh}x{fw} only: {what}")
    if problems:
        raise ValueError("image sizes the model cannot take:\n  " + "\n  ".join(dict.fromkeys(problems)) + "\n"
                         "use every view at the model's img_size (e.g. no local crops), or pos_embed='rope' (any size)")


def _multiples(side: int, patch: int) -> str:
    below = side // patch * patch
    return f"{below} or {below + patch}" if below else f"{patch}"


def check_patch_multiples(transforms: Mapping[str, Optional[Callable]], patch_sizes: Sequence[Size]) -> None:
    """Raise ``ValueError`` naming every transform output whose sides are not multiples of a patch size.

    Args:
        transforms: name (as the recipe spells it, e.g. ``"data.train_transform"``) -> transform.
        patch_sizes: ``(ph, pw)`` of the model's patch embeddings.
    """
    problems = []
    for name, transform in transforms.items():
        sizes = view_sizes(transform)
        for index, (h, w) in enumerate(sizes or []):
            for ph, pw in patch_sizes:
                if h % ph or w % pw:
                    view = f" view {index}" if len(sizes) > 1 else ""
                    problems.append(
                        f"{name} ({type(transform).__name__}){view} makes {h}x{w} images, not a multiple of the "
                        f"model's {ph}x{pw} patches (use e.g. {_multiples(h, ph)})"
                    )
    if problems:
        raise ValueError("image sizes must be multiples of the patch size:\n  " + "\n  ".join(dict.fromkeys(problems)))


def stage_transforms(datamodule: Any, stage: str) -> Dict[str, Optional[Callable]]:
    """The transforms a stage will run: the train transform when fitting, the validation transform
    when there is validation data. A datamodule wrapping another one (``CachedFeatures.data``) is
    looked through."""
    inner = getattr(datamodule, "data", None)
    prefix = "data"
    if isinstance(inner, pl.LightningDataModule):
        datamodule, prefix = inner, "data.data"
    found: Dict[str, Optional[Callable]] = {}
    if stage == "fit":
        found[f"{prefix}.train_transform"] = getattr(datamodule, "train_transform", None)
    if stage in ("fit", "validate") and getattr(datamodule, "val", None) is not None:
        found[f"{prefix}.val_transform"] = getattr(datamodule, "val_transform", None)
    return found


def check_run(module: pl.LightningModule, stage: str, trainer: Optional["pl.Trainer"] = None) -> None:
    """Every start-up check of ``module`` about to run ``stage`` (``"fit"``, ``"validate"``...) on
    its trainer's datamodule (nothing is checked without one): training data that holds no
    sample, image sizes that are not multiples of the patch size, sizes a one-size backbone
    (``pos_embed="rel_bias"``) cannot take."""
    trainer = trainer if trainer is not None else module._trainer
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None:
        return
    if stage == "fit" and getattr(datamodule, "num_train_samples", None) == 0:
        raise ValueError(f"the training data {getattr(datamodule, 'train', '')!r} holds no samples")
    patch_sizes = model_patch_sizes(module)
    if patch_sizes:
        check_patch_multiples(stage_transforms(datamodule, stage), patch_sizes)
    fixed = model_fixed_sizes(module)
    if fixed:
        check_fixed_sizes(stage_transforms(datamodule, stage), fixed)


class StartupChecks(pl.Callback):
    """Run :func:`check_run` when a stage starts (the ``setup`` hook): what can be known to be wrong
    fails there, naming the option, before any compute. A run that fails leaves no empty logger
    folders behind (``csv/version_N`` with nothing in it): only folders that are empty are removed."""

    def setup(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, stage: str) -> None:
        check_run(pl_module, stage, trainer)

    def on_exception(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # the version folder, then the logger's own (save_dir/name)
                remove_if_empty(getattr(logger, "log_dir", None))
                remove_if_empty(getattr(logger, "root_dir", None))


def remove_if_empty(folder: Optional[str]) -> None:
    """Remove ``folder`` if it exists and holds nothing (a logger's version folder of a failed start)."""
    if folder and os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)


# -- resuming through the CLI -----------------------------------------------------------------------
# ``--ckpt_path`` values Lightning resolves itself (to a file of the run, or a registry model).
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


def check_resume_file(ckpt_path: str) -> None:
    """Raise one clear error, naming ``--ckpt_path`` and the problem, when the file cannot be read
    as the training checkpoint Lightning will ``torch.load(weights_only=True)`` (see
    ``ssl_vit.checkpoints.io.check_checkpoint_file``): without it, an empty file ends in a bare
    ``EOFError``, a damaged one in a zip reader error, and a pickle with code in torch's advice to
    load it with ``weights_only=False``. Lightning's names (``last``...), remote URLs and sharded
    checkpoint folders are left to Lightning."""
    if ckpt_path in LIGHTNING_CKPT_NAMES or ckpt_path.startswith("registry:") or "://" in ckpt_path:
        return
    path = Path(ckpt_path)
    if path.is_dir() and not (path / "model.safetensors").is_file():
        return  # a sharded checkpoint: the strategy reads it
    try:
        check_checkpoint_file(path, allowed=())  # Lightning allows no more than torch's own list
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"--ckpt_path: {err}") from None


def _plain(value: Any) -> Any:
    """A jsonargparse ``Namespace`` (or anything else) as plain dicts / lists for comparison."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def model_config_differences(recipe: Any, resumed: Any) -> List[str]:
    """Lines naming where the checkpoint's model configuration differs from the recipe's.

    Args:
        recipe: the ``model`` configuration as the recipe and command line give it
            (``{"class_path", "init_args"}``).
        resumed: the same after LightningCLI merged the checkpoint's hyperparameters into it.
    """
    recipe, resumed = _plain(recipe) or {}, _plain(resumed) or {}
    if recipe.get("class_path") != resumed.get("class_path"):
        return [f"method: the recipe trains {recipe.get('class_path')}, the checkpoint holds {resumed.get('class_path')}"]
    before, after = recipe.get("init_args") or {}, resumed.get("init_args") or {}
    return [
        f"{key}: recipe {before.get(key)!r}, checkpoint {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]


def check_resume_config(recipe: Any, resumed: Any, ckpt_path: str) -> None:
    """Raise ``ValueError`` when resuming from ``ckpt_path`` would change the recipe's model."""
    differences = model_config_differences(recipe, resumed)
    if differences:
        raise ValueError(
            f"--ckpt_path {ckpt_path} was written by another model than the recipe's; Lightning would "
            "resume with the checkpoint's and ignore the recipe's:\n  " + "\n  ".join(differences)
        )
