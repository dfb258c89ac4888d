"""Pointing a recipe at one stage of the benchmark: the second ``--config`` a stage runs with.

A recipe names placeholder data paths and run directories; :func:`recipe_overrides` returns the
settings that move a run onto the benchmark's shards or image folders, its stage folder (CSV
logger, ``default_root_dir``, the ``dirpath`` of every callback that has one), the device and loader settings, and an epoch count with the recipe's warm-ups scaled to
it. jsonargparse merges it over the recipe (lists, such as the callbacks, are replaced whole).
"""
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ssl_vit.apps.quality.plan import scaled_warmups


@dataclass
class StageData:
    """Where a stage's data is and how it is loaded.

    Args:
        folders: ``{"train": dir, "test": dir}`` ImageFolder trees.
        shards: ``{"train": pattern, "val": pattern}`` shard patterns.
        seed: ``seed_everything``.
        device: ``auto``, ``gpu`` or ``cpu`` (``cpu``: fp32, no pinned memory).
        workers: loader workers (``None``: the recipe's).
        batch_size: batch size (``None``: the recipe's).
    """

    folders: Mapping[str, str]
    shards: Mapping[str, str]
    seed: int = 0
    device: str = "auto"
    workers: Optional[int] = None
    batch_size: Optional[int] = None


def put(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    """``tree["a"]["b"]["c"] = value`` for ``"a.b.c"``, creating the levels."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _datamodule(tree: Dict[str, Any], prefix: str, recipe_args: Mapping[str, Any], kind: str, data: StageData) -> None:
    """Point a datamodule's init_args (at ``prefix``) at the stage's data and loader settings."""
    if kind.endswith("ImageFolderDataModule"):
        source = {"train": data.folders["train"], "val": data.folders["test"]}
    elif kind.endswith("ShardDataModule"):
        source = dict(data.shards)
    else:
        raise ValueError(f"cannot point a {kind or 'missing'} datamodule at the benchmark data "
                         "(ShardDataModule or ImageFolderDataModule)")
    source["eval_train"] = source["train"]  # the k-NN monitor's bank: the training data, read for evaluation
    for split in ("train", "val", "eval_train"):
        if split in recipe_args:
            put(tree, f"{prefix}.{split}", source[split])
    if data.workers is not None:
        put(tree, f"{prefix}.num_workers", data.workers)
    if data.batch_size is not None:
        put(tree, f"{prefix}.batch_size", data.batch_size)
    if data.device == "cpu":
        put(tree, f"{prefix}.pin_memory", False)


def callbacks(recipe: Mapping[str, Any], stage_dir: Path, data: StageData) -> List[Dict[str, Any]]:
    """The recipe's callbacks with their checkpoint folder moved to this stage (their data is the
    stage's DataModule: the k-NN monitor and the attention gallery read it)."""
    found = copy.deepcopy(recipe.get("trainer", {}).get("callbacks") or [])
    for callback in found:
        args = callback.get("init_args") or {}
        callback["init_args"] = args
        if "dirpath" in args:
            args["dirpath"] = str(stage_dir / "checkpoints")
    return found


def recipe_overrides(recipe: Mapping[str, Any], stage_dir: Path, data: StageData, epochs: Optional[int] = None) -> Dict[str, Any]:
    """The second ``--config`` of a stage (see the module docstring)."""
    tree: Dict[str, Any] = {"seed_everything": data.seed}
    put(tree, "trainer.default_root_dir", str(stage_dir))
    put(tree, "trainer.logger", {"class_path": "pytorch_lightning.loggers.CSVLogger",
                                 "init_args": {"save_dir": str(stage_dir), "name": "csv"}})
    recipe_callbacks = recipe.get("trainer", {}).get("callbacks") or []
    if not any(str(c.get("class_path", "")).endswith("ProgressBar") for c in recipe_callbacks):
        put(tree, "trainer.enable_progress_bar", False)  # else the recipe's bar (it refreshes rarely)
    if data.device == "cpu":
        put(tree, "trainer.accelerator", "cpu")
        put(tree, "trainer.precision", "32-true")
    elif data.device == "gpu":
        put(tree, "trainer.accelerator", "gpu")
    module = recipe["data"]
    if module["class_path"].endswith("CachedFeatures"):  # features of a wrapped image datamodule
        if data.batch_size is not None:
            put(tree, "data.init_args.batch_size", data.batch_size)
        inner = module["init_args"]["data"]
        _datamodule(tree, "data.init_args.data.init_args", inner.get("init_args") or {}, inner["class_path"], data)
    else:
        _datamodule(tree, "data.init_args", module.get("init_args") or {}, module["class_path"], data)
    put(tree, "trainer.callbacks", callbacks(recipe, stage_dir, data))
    if epochs is not None:
        recipe_epochs = recipe.get("trainer", {}).get("max_epochs")
        if not recipe_epochs:
            raise ValueError("the recipe has no trainer.max_epochs: its epochs cannot be changed (a validate recipe?)")
        put(tree, "trainer.max_epochs", epochs)
        for name, value in scaled_warmups(recipe["model"]["init_args"], int(recipe_epochs), epochs).items():
            put(tree, f"model.init_args.{name}", value)
    return tree
