"""Fitting a pretraining run into a time budget.

The learning-rate, weight-decay, EMA and temperature schedules are built from ``max_epochs`` when
the run starts, so stopping a run at ``trainer.max_time`` would cut every cosine half-way. Instead a
short timed run (two epochs of the real recipe on the real data, :class:`RunRecord` writing the time
of each epoch end) measures the steady-state epoch time, :func:`plan_epochs` turns the time left
into a whole number of epochs, and ``max_time`` stays only as the hard stop. The recipe's warm-ups
are scaled with the epoch count (:func:`scaled_warmups`) so they keep their share of the schedule.
"""
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import pytorch_lightning as pl

# Schedule lengths in epochs that scale with the run (DINO: lr warm-up, teacher temperature ramp).
WARMUP_KEYS = ("warmup_epochs", "warmup_teacher_temp_epochs")
MARGIN = 0.08  # share of the time left kept for what the timed epochs do not see (validation, monitors)


class RunRecord(pl.Callback):
    """Record what a training run did, as JSON at ``path`` at the end of fit (global rank 0).

    Written: ``epoch_end_s`` (seconds from the start of training to the end of each epoch of this
    process's fit), ``epochs_completed``, ``max_epochs``, ``global_step``, ``steps_per_epoch``,
    ``stopped_early`` (fewer steps than ``max_epochs`` x ``steps_per_epoch``: e.g. ``max_time``).

    Args:
        path: the JSON file.
        checkpoint: if set, the final weights (and the module's checkpoint metadata) are saved there
            at the end of fit, whatever the checkpoint callbacks of the recipe kept.
    """

    def __init__(self, path: str, checkpoint: Optional[str] = None) -> None:
        super().__init__()
        self.path, self.checkpoint = Path(path), checkpoint
        self.start = 0.0
        self.epoch_end_s: List[float] = []

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.start = time.perf_counter()
        self.epoch_end_s = []

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.epoch_end_s.append(round(time.perf_counter() - self.start, 3))

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.checkpoint is not None:
            trainer.save_checkpoint(self.checkpoint, weights_only=True)  # every rank: a collective
        if not trainer.is_global_zero:
            return
        batches = trainer.num_training_batches
        steps_per_epoch = max(int(batches) // trainer.accumulate_grad_batches, 1) if math.isfinite(batches) else None
        planned = None if steps_per_epoch is None or trainer.max_epochs is None else trainer.max_epochs * steps_per_epoch
        record = {
            "epoch_end_s": self.epoch_end_s,
            "epochs_completed": trainer.current_epoch,
            "max_epochs": trainer.max_epochs,
            "global_step": trainer.global_step,
            "steps_per_epoch": steps_per_epoch,
            "stopped_early": planned is not None and trainer.global_step < planned,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(self.path)


def epoch_seconds(record: Mapping[str, Any]) -> float:
    """Steady-state seconds per epoch of a timed run: the mean of its epochs after the first (the
    first pays for compilation, cuDNN autotuning and the first worker start-up)."""
    ends = list(record["epoch_end_s"])
    if len(ends) < 2:
        raise ValueError(f"a timed run needs at least 2 epochs to measure one, it recorded {len(ends)}")
    return (ends[-1] - ends[0]) / (len(ends) - 1)


def plan_epochs(budget_s: float, spent_s: float, timed: Mapping[str, Any], margin: float = MARGIN) -> Dict[str, float]:
    """Whole epochs that fit the time left of a budget.

    Args:
        budget_s: the stage's budget in seconds.
        spent_s: seconds already spent (the timed run, start-up included).
        timed: a :class:`RunRecord` of the timed run plus ``wall_s``, its process's wall time.
        margin: share of the time left kept free.

    Returns:
        ``{"epochs", "epoch_s", "startup_s", "max_time_s"}``: ``startup_s`` is the timed process's time
        outside its epochs (imports, data set-up, teardown), paid again by the real run, as is the
        first epoch's extra time over ``epoch_s``; ``max_time_s`` (the hard stop, counted by Lightning
        from the start of training) is the time left after that start-up.

    Raises:
        ValueError: when not even one epoch fits, naming the figures.
    """
    epoch_s = epoch_seconds(timed)
    startup_s = max(float(timed["wall_s"]) - float(timed["epoch_end_s"][-1]), 0.0)
    first_extra_s = max(float(timed["epoch_end_s"][0]) - epoch_s, 0.0)  # the slower first epoch
    left = budget_s - spent_s - startup_s
    usable = left - first_extra_s
    epochs = math.floor(usable * (1.0 - margin) / epoch_s) if epoch_s > 0 else 0
    if epochs < 1:
        raise ValueError(
            f"the budget of {budget_s / 60:.1f} min leaves {max(left, 0) / 60:.1f} min after the timed run "
            f"({spent_s:.0f} s) and start-up ({startup_s:.0f} s), less than one epoch ({epoch_s:.0f} s): "
            "raise --budget-minutes or give --epochs"
        )
    return {"epochs": epochs, "epoch_s": round(epoch_s, 3), "startup_s": round(startup_s, 1), "max_time_s": round(left, 1)}


def scaled_warmups(init_args: Mapping[str, Any], recipe_epochs: int, epochs: int) -> Dict[str, float]:
    """The recipe's warm-up lengths (``WARMUP_KEYS`` present in ``init_args``) scaled by
    ``epochs / recipe_epochs``, so that each keeps its share of the run. DINO's teacher temperature
    changes once per epoch (as the reference), so its ramp stays a whole number of epochs (>= 1)."""
    if recipe_epochs < 1 or epochs < 1:
        raise ValueError(f"epochs must be >= 1 (recipe {recipe_epochs}, run {epochs})")
    scaled = {k: round(float(init_args[k]) * epochs / recipe_epochs, 3) for k in WARMUP_KEYS if init_args.get(k)}
    if "warmup_teacher_temp_epochs" in scaled and not init_args.get("teacher_temp_per_step"):
        scaled["warmup_teacher_temp_epochs"] = max(1, round(scaled["warmup_teacher_temp_epochs"]))
    return scaled


def max_time(seconds: float) -> str:
    """Lightning's ``max_time`` string ``DD:HH:MM:SS`` (whole seconds, at least 1)."""
    total = max(int(seconds), 1)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}"
