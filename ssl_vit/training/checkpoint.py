"""Checkpoints for runs that must survive crashes and preemption: atomic writes, the last ``k`` kept,
and the random number generators carried along so that a resumed run continues exactly.

**Atomic.** Every file (the step checkpoints and ``last.ckpt``) is first written as
``.<name>.partial`` in the same folder (by ``trainer.save_checkpoint``: every rank takes part, rank 0
writes, all wait at its barrier), flushed to disk, then renamed over the final name by rank 0 with
``os.replace`` (atomic on POSIX file systems), and the folder entry is flushed. A crash during a save
leaves the previous files untouched and at most a ``.partial`` file, which Lightning never takes for a
checkpoint (``--ckpt_path last`` looks for ``last*.ckpt``) and which the next run's ``setup`` deletes.
Older checkpoints are deleted only after the new one is in place. Sharded checkpoints (a folder per
checkpoint) are swapped in with two renames. Remote paths (``s3://``...) are refused: they have no
atomic rename.

**Random generators.** ``on_save_checkpoint`` stores, for every rank, the torch CPU, CUDA (the
rank's current device, when CUDA is in use), Python ``random`` and NumPy states under
``checkpoint["rng_states"]`` (plain tensors and tuples: the checkpoint still loads with
``weights_only=True``); ``on_load_checkpoint`` keeps this
rank's entry and ``on_train_start`` puts it back, after Lightning's sanity check (which resets the
seed) and after the data loaders were created, i.e. just before the first resumed step. With the
data position restored by the ssl_vit DataModules (:mod:`ssl_vit.data.resume`), and the schedules
derived from ``global_step``, a run stopped after a checkpoint and resumed from it takes the same
steps as one that never stopped.
"""
import math
import os
import random
import re
import shutil
from datetime import timedelta
from typing import Any, Dict, List, Optional
from weakref import proxy

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_warn

RNG_KEY = "rng_states"
PARTIAL_SUFFIX = ".partial"
_PARTIAL = re.compile(r"^\..+" + re.escape(PARTIAL_SUFFIX) + r"$")


# -- random generator states ----------------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    """This process's generator states, as tensors and tuples of numbers (weights-only loadable)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # this process's device only (reading every device's state would open a context on each)
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (the CUDA state onto this process's current device)."""
    torch.set_rng_state(state["torch"])
    if isinstance(state.get("cuda"), torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _gather(obj: Any) -> List[Any]:
    """``obj`` of every rank (rank order); ``[obj]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# -- atomic files ---------------------------------------------------------------------------------
def partial_path(filepath: str) -> str:
    """``dir/.name.partial`` for ``dir/name``: same folder (so the rename is atomic), never ``*.ckpt``."""
    folder, name = os.path.split(filepath)
    return os.path.join(folder, "." + name + PARTIAL_SUFFIX)


def _fsync(path: str) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def replace_atomically(partial: str, filepath: str) -> None:
    """Move a completely written ``partial`` (file or folder) to ``filepath``."""
    if os.path.isdir(partial):
        for root, _, files in os.walk(partial):
            for f in files:
                _fsync(os.path.join(root, f))
        old = partial_path(filepath + ".old")
        if os.path.lexists(filepath):
            _remove(old)
            os.replace(filepath, old)
        os.replace(partial, filepath)
        _remove(old)
    else:
        _fsync(partial)
        os.replace(partial, filepath)
    _fsync(os.path.dirname(os.path.abspath(filepath)))


def epoch_cut_short(trainer: "pl.Trainer") -> bool:
    """Whether the training epoch now ending stopped before its last batch (``max_steps`` reached)."""
    total = trainer.num_training_batches
    return math.isfinite(total) and trainer.fit_loop.epoch_loop.batch_progress.current.ready < total


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with atomic files, the last ``keep_last`` step-ordered checkpoints (or the
    best, with ``monitor``) plus ``last.ckpt``, and the RNG states (see the module docstring).

    The newest checkpoints are kept (``monitor="step"``, ``mode="max"``, ``save_top_k=keep_last``);
    a checkpoint is written every ``every_n_train_steps`` optimiser steps, or every ``every_n_epochs``
    epochs, or every ``train_time_interval``. Names are ``{epoch}-{step}`` by default; an existing file
    of the same name (a step reached again after resuming from an older checkpoint) is replaced.
    Resume with ``ssl-vit fit --config RECIPE --ckpt_path last`` (or a path).

    Args:
        dirpath: folder of the checkpoints (default: Lightning's, under the logger or
            ``default_root_dir``). Local or mounted file systems only.
        filename: name pattern (``ModelCheckpoint`` syntax), e.g. ``"{epoch:03d}-{step:07d}"``.
        every_n_train_steps: save after every this many optimiser steps.
        every_n_epochs: save at the end of every this many epochs.
        train_time_interval: save at most this often (a ``datetime.timedelta``).
        keep_last: checkpoints to keep besides ``last.ckpt`` (-1: all, 0: only ``last.ckpt``): the
            newest ones, or with ``monitor`` the best ones.
        monitor: a logged metric (``"val/top1"``) ranking the kept checkpoints instead of their step
            (probe and finetune runs: keep the best, resume from ``last.ckpt``).
        mode: ``"max"`` or ``"min"``: which ``monitor`` values are best.
        save_last: keep ``last.ckpt``, a copy of the newest checkpoint (the resume point).
        save_weights_only: save the module's weights only (such files cannot resume a run).
        auto_insert_metric_name: ``epoch=3-step=100`` instead of ``3-100`` for ``{epoch}-{step}``.
        save_on_train_epoch_end: as ``ModelCheckpoint``.
        verbose: log each save.
    """

    def __init__(
        self,
        dirpath: Optional[str] = None,
        filename: Optional[str] = None,
        every_n_train_steps: Optional[int] = None,
        every_n_epochs: Optional[int] = None,
        train_time_interval: Optional[timedelta] = None,
        keep_last: int = 1,
        monitor: Optional[str] = None,
        mode: str = "max",
        save_last: bool = True,
        save_weights_only: bool = False,
        auto_insert_metric_name: bool = True,
        save_on_train_epoch_end: Optional[bool] = None,
        verbose: bool = False,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"Checkpoint: mode must be 'max' or 'min', got {mode!r}")
        if keep_last < -1:
            raise ValueError(f"Checkpoint: keep_last must be >= -1 (-1 keeps all), got {keep_last}")
        for name, value in dict(every_n_train_steps=every_n_train_steps, every_n_epochs=every_n_epochs).items():
            if value is not None and value < 1:
                raise ValueError(f"Checkpoint: {name} must be >= 1 when given, got {value}")
        if dirpath is not None and "://" in str(dirpath):
            raise ValueError(
                f"Checkpoint: dirpath {dirpath!r} is not a local path; atomic writes need os.replace "
                "(mount the bucket, or use pytorch_lightning.callbacks.ModelCheckpoint)"
            )
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor or "step",
            mode=mode if monitor else "max",
            save_top_k=keep_last,
            save_last=bool(save_last),
            save_weights_only=save_weights_only,
            auto_insert_metric_name=auto_insert_metric_name,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=every_n_epochs,
            train_time_interval=train_time_interval,
            save_on_train_epoch_end=save_on_train_epoch_end,
            verbose=verbose,
            enable_version_counter=False,
        )
        self.keep_last = keep_last
        self._rng_to_restore: Optional[Dict[str, Any]] = None

    # -- atomic saves ------------------------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if "://" in str(self.dirpath):
            raise ValueError(f"Checkpoint: dirpath {self.dirpath!r} is not a local path; atomic writes need os.replace")
        if trainer.is_global_zero and os.path.isdir(str(self.dirpath)):
            for name in os.listdir(self.dirpath):  # left by a run killed during a save
                if _PARTIAL.match(name):
                    _remove(os.path.join(self.dirpath, name))

    def _save_checkpoint(self, trainer: "pl.Trainer", filepath: str) -> None:
        """``ModelCheckpoint._save_checkpoint`` (same bookkeeping), writing through a partial file."""
        partial = partial_path(filepath)
        try:
            trainer.save_checkpoint(partial, self.save_weights_only)
            if trainer.is_global_zero:
                replace_atomically(partial, filepath)
        except BaseException:
            if trainer.is_global_zero:
                _remove(partial)
            raise
        trainer.strategy.barrier("Checkpoint.replace")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def save_last_now(self, trainer: "pl.Trainer") -> str:
        """Write ``last.ckpt`` for the current step now, outside the schedule, through the same atomic
        path (for :class:`~ssl_vit.training.preemption.Preemption`). Every rank must call it at the
        same point: the save is collective. It counts as this step's save, so the scheduled save of
        the same step (this callback's ``on_train_batch_end`` runs later in that hook) is skipped.

        Returns:
            The path of ``last.ckpt``.
        """
        if not self.save_last:
            raise ValueError("Checkpoint.save_last_now: this Checkpoint has save_last=False (it writes no last.ckpt)")
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path

    # -- a run stopped by max_steps ----------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.save_last and 0 <= trainer.max_steps <= trainer.global_step and not self._should_skip_saving_checkpoint(trainer):
            # the run's last step: last.ckpt as the mid-epoch state it is (see on_train_epoch_end)
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """``ModelCheckpoint``'s epoch-end saves, except when ``max_steps`` cut the epoch short:
        Lightning calls the epoch-end hooks then too, with the epoch counted as done, so a file
        written there resumes at the start of the next epoch (the rest of this one never read, the
        bar saying "Epoch 1"). The last step was saved in ``on_train_batch_end`` instead."""
        if epoch_cut_short(trainer):
            return
        super().on_train_epoch_end(trainer, pl_module)

    # -- RNG states --------------------------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: Dict[str, Any]
    ) -> None:
        checkpoint[RNG_KEY] = _gather(rng_state())  # every rank calls this (trainer.save_checkpoint)

    def on_load_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: Dict[str, Any]
    ) -> None:
        states = checkpoint.get(RNG_KEY)
        if not states:
            rank_zero_warn("the checkpoint holds no RNG states: random streams go on from the seed (not an exact resume)")
        elif len(states) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds RNG states of {len(states)} processes, this run has {trainer.world_size}: "
                "random streams go on from the seed (not an exact resume)"
            )
        else:
            self._rng_to_restore = states[trainer.global_rank]

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_start(trainer, pl_module)
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
