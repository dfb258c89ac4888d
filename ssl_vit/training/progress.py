"""A progress bar that moves whatever the step time.

Lightning's ``TQDMProgressBar`` redraws every ``refresh_rate`` batches, and each redraw reads the
logged values (a host sync), so long-running recipes set ``refresh_rate: 50``. When a step takes
seconds (a CPU, a large model) that bar sits at ``0/N`` for minutes, and a 20-step run never moves.
``ProgressBar`` also redraws once ``refresh_seconds`` have passed since the last redraw: at most one
extra sync every few seconds, none on fast steps.
"""
import json
import math
import time
from pathlib import Path
from typing import Any, List, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` that also redraws the training bar every ``refresh_seconds``.

    Args:
        refresh_rate: batches between redraws (as ``TQDMProgressBar``).
        refresh_seconds: the longest time the training bar goes without a redraw.
        process_position: as ``TQDMProgressBar``.
    """

    def __init__(self, refresh_rate: int = 50, refresh_seconds: float = 2.0, process_position: int = 0) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position)
        if not refresh_seconds > 0:
            raise ValueError(f"ProgressBar: refresh_seconds must be > 0, got {refresh_seconds}")
        self.refresh_seconds = refresh_seconds
        self._last_draw = time.monotonic()

    def on_train_epoch_start(self, trainer: "pl.Trainer", *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._last_draw = time.monotonic()

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """A run resumed mid-epoch gets no ``on_train_epoch_start`` from Lightning: the bar would
        read ``Training: 0/?``. It is set up here as that hook would, at the batch the epoch resumes."""
        super().on_train_start(trainer, pl_module)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if trainer.fit_loop.restarted_mid_epoch or done > 0:
            self.on_train_epoch_start(trainer)
            bar = self.train_progress_bar
            # Lightning's total counts from the epoch's start, or the steps left under max_steps
            total = min(trainer.num_training_batches, done + self.total_train_batches)
            bar.total = None if math.isinf(total) else int(total)
            bar.initial = bar.n = done
            bar.refresh()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        before = bar.n if bar is not None else None
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        now = time.monotonic()
        if bar is None or not self.is_enabled:
            return
        if bar.n != before:  # the batch-count rule just redrew it
            self._last_draw = now
        elif now - self._last_draw >= self.refresh_seconds:
            bar.n = batch_idx + 1
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws too
            self._last_draw = now


class StepTimer(pl.Callback):
    """Wall time of every training batch (data wait included), written as JSON at the end of fit:
    ``{"step_s": [...], "median_s": ...}`` in ``path`` (``tools/measure_figures.py`` reads it).

    The first batch includes the workers' start and the first compilation or allocation; the median
    of the rest is the step time the docs quote.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.step_s: List[float] = []
        self._last: Optional[float] = None

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._last = time.perf_counter()

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.step_s.append(now - self._last)
        self._last = now

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.is_global_zero:
            return
        rest = sorted(self.step_s[1:]) or sorted(self.step_s)
        median = rest[len(rest) // 2] if rest else None
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).write_text(json.dumps({"step_s": self.step_s, "median_s": median}, indent=1))

