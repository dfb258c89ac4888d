"""Callbacks the multi-process and SLURM tests add to real CLI runs (``PYTHONPATH=tests``).

Each process of a run writes its own files into a folder given on the command line, so a test can
compare what the ranks saw and did after the run has ended:

* :class:`Recorder`: per rank, the labels of every batch read, the DINO centre after every step,
  the parameters at the start and the end, and every file the process wrote or renamed (a Python
  audit hook), in ``<folder>/rank<R>.pt`` (written at exit, so logger finalisation is included).
* :class:`SignalAtStep`: sends a signal to its own process (and its DataLoader workers) at a given
  step, at the end of the batch or from inside the step (SLURM's warning before preemption).
* :class:`StepLog`: appends the ``global_step`` at the start and the end of every fit to a file.
"""
import atexit
import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import pytorch_lightning as pl
import torch

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _opened_for_writing(mode: Any, flags: Any) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


class Recorder(pl.Callback):
    """Records what this process read, computed and wrote (see the module docstring).

    Args:
        folder: where ``rank<R>.pt`` goes (created if needed); keep it outside the run directory.
    """

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.record: Dict[str, Any] = {"batches": [], "centres": [], "written": []}
        self._rank: Optional[int] = None
        sys.addaudithook(self._audit)  # this process only; every rank builds its own Recorder
        atexit.register(self._dump)

    def _audit(self, event: str, args: tuple) -> None:
        if event == "open" and _opened_for_writing(args[1], args[2]) and isinstance(args[0], (str, bytes, os.PathLike)):
            self.record["written"].append(os.path.abspath(os.fsdecode(args[0])))
        elif event == "os.rename":  # os.rename and os.replace (atomic saves rename into place)
            self.record["written"].append(os.path.abspath(os.fsdecode(args[1])))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rank = trainer.global_rank
        environment = type(trainer.strategy.cluster_environment).__name__
        self.record.update(rank=trainer.global_rank, world_size=trainer.world_size, pid=os.getpid(), environment=environment)
        self.record["start_step"] = trainer.global_step
        with open(self.folder / f"started_rank{trainer.global_rank}", "w") as f:  # proves the audit hook works
            f.write(str(os.getpid()))
        self.record["params_start"] = _state(trainer)
        self.record["param_groups"] = [(len(g["params"]), g["weight_decay"]) for g in trainer.optimizers[0].param_groups]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        labels = batch[1]
        rng = hashlib.sha1(torch.random.get_rng_state().numpy().tobytes()).hexdigest()  # the masks / crops drawn next
        self.record["batches"].append(
            {"epoch": trainer.current_epoch, "step": trainer.global_step, "labels": labels.tolist(), "rng": rng}
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = getattr(pl_module, "loss", None)
        centre = getattr(loss, "center", None)
        if isinstance(centre, torch.Tensor):
            self.record["centres"].append(centre.detach().cpu().clone())
        if isinstance(outputs, dict) and isinstance(outputs.get("loss"), torch.Tensor):
            self.record.setdefault("losses", []).append(float(outputs["loss"].detach()))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["end_step"] = trainer.global_step
        self.record["params_end"] = _state(trainer)

    def _dump(self) -> None:
        if self._rank is not None:
            torch.save(self.record, self.folder / f"rank{self._rank}.pt")


def _state(trainer: pl.Trainer) -> Dict[str, torch.Tensor]:
    """The full module state on this rank (a collective under FSDP, where rank 0 gets it)."""
    state = trainer.strategy.lightning_module_state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


class SignalAtStep(pl.Callback):
    """Sends ``signal`` to this very process once ``global_step`` reaches ``step`` (SLURM's warning).

    Args:
        step: the ``global_step`` at which the signal is sent.
        signal: signal name (``SIGUSR1``: SLURM's warning before the time limit with ``--signal``).
        when: ``"batch_end"``: at the end of the batch (a step boundary); ``"after_optimizer_step"``:
            from inside the step, right after the optimiser's update and before anything Lightning or
            the module does next (the DINO teacher EMA, ``global_step`` counting the step).
        rank: send on this global rank only (default: every rank).
        workers: also send to this process's DataLoader workers, as SLURM signals every process of
            the job step.
        group: send to this process's whole process group instead, from another process (what
            slurmstepd and a terminal's Ctrl-C do; torch's workers take a SIGTERM from their parent
            as the order to exit): the process must lead its group (started with
            ``start_new_session=True``), or the signal would reach the test runner too.
        rest_of_step: seconds the step goes on after sending (a long step: time in which the
            workers' fate reaches the main process).
    """

    def __init__(
        self, step: int, signal: str = "SIGUSR1", when: str = "batch_end", rank: Optional[int] = None,
        workers: bool = False, group: bool = False, rest_of_step: float = 0.0,
    ) -> None:
        super().__init__()
        if group and os.getpgrp() != os.getpid():
            raise ValueError("SignalAtStep(group=True): this process does not lead its process group")
        if when not in ("batch_end", "after_optimizer_step"):
            raise ValueError(f"SignalAtStep: when must be 'batch_end' or 'after_optimizer_step', got {when!r}")
        self.step, self.signum = step, getattr(__import__("signal"), signal)
        self.when, self.rank, self.workers, self.group = when, rank, workers, group
        self.rest_of_step = rest_of_step
        self.sent = False
        self._trainer: Optional[pl.Trainer] = None

    def _send(self) -> None:
        trainer = self._trainer
        if self.sent or trainer is None or trainer.global_step < self.step:
            return
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        self.sent = True
        if self.group:
            assert multiprocessing.active_children(), "SignalAtStep(group=True): this process has no DataLoader workers"
            subprocess.run(["sh", "-c", f"kill -s {signal.Signals(self.signum).name[3:]} -- -{os.getpgrp()}"],
                           timeout=60)  # sh is in the group too: it may die of the signal, after sending it
            time.sleep(self.rest_of_step)
            return
        if self.workers:
            children = multiprocessing.active_children()
            assert children, "SignalAtStep(workers=True): this process has no DataLoader workers"
            for child in children:
                os.kill(child.pid, self.signum)
        signal.raise_signal(self.signum)  # handlers run before this returns

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        if self.when == "after_optimizer_step":
            for optimizer in trainer.optimizers:
                optimizer.register_step_post_hook(lambda *args: self._send())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.when == "batch_end":
            self._send()


class StepLog(pl.Callback):
    """Appends ``start <global_step>`` when training starts and ``end <global_step>`` when it ends
    to ``path`` (a run killed in between leaves only its ``start`` line)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def _write(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(f"start {trainer.global_step}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(f"end {trainer.global_step}")
