"""Preemption and time limits under SLURM: checkpoint at a step boundary, requeue, stop cleanly.

SLURM warns a job before it ends it: ``#SBATCH --signal=SIGUSR1@90`` sends SIGUSR1 to every task
90 s before the time limit (and at preemption where the cluster sets
``PreemptParameters=send_user_signal``). Lightning's own answer (``SLURMEnvironment(auto_requeue=True)``)
calls ``trainer.save_checkpoint`` from inside the Python signal handler, i.e. after whichever
bytecode the main thread had just run: between the AdamW step and the DINO teacher update, before
``global_step`` counts the step (a checkpoint of a state no step boundary ever had); under DDP each
rank enters the save's collectives at a different point of its step (with NCCL: mismatched
collectives or a hang); and the file is not written atomically.

:class:`Preemption` does no work in the handler: it records the signal, nothing else. At the end of
a training batch that completed an optimiser step, the ranks agree on whether any of them was
signalled (every step on one process, where that is a Python attribute read; every
``check_every`` steps on several, where it is one tiny all-reduce and therefore a host sync). When
one was, every rank takes part in writing ``last.ckpt`` through the resume
:class:`~ssl_vit.training.checkpoint.Checkpoint` (atomic, RNG states, data position: a run resumed
with ``--ckpt_path last`` continues exactly), global rank 0 runs ``scontrol requeue <job id>`` when
the run is a SLURM job, and all ranks set ``trainer.should_stop``: the process ends normally (exit
status 0) after the current batch, without starting another.

**Why checking every N steps is safe.** The checkpoint is written at most ``check_every`` optimiser
steps after the signal, so the warning must cover ``check_every x step time + save time``: with
SLURM's 90 s, ``check_every=10`` leaves room for steps up to ~5 s and a checkpoint written in
~30 s (ViT-L with AdamW is ~4 GB). Lower ``check_every`` (or raise ``--signal``'s lead time) for
slower steps. Work between two training batches counts too: validation, or an epoch-end k-NN
monitor, longer than the warning leaves the signal unanswered until SLURM kills the job.

Use it with Lightning's handler turned off (``--trainer.plugins
'{"class_path": "pytorch_lightning.plugins.environments.SLURMEnvironment", "init_args":
{"auto_requeue": false}}'``, as ``recipes/slurm/pretrain.sbatch`` does); with both, ``setup`` refuses
to start. DataLoader workers get the signal too (SLURM signals every process of the step; Ctrl-C
reaches the whole process group): from ``setup`` to ``teardown`` the callback registers its signals
with :mod:`ssl_vit.data.workers`, and the ssl_vit DataModules' workers ignore them (their
``worker_init_fn``), whatever their start method, so that none dies before the main process has
saved (SIGTERM used to kill them: ``DataLoader worker ... killed by signal: Terminated``, exit 1,
nothing saved).

**Ctrl-C.** With ``signals`` including ``SIGINT``, the first Ctrl-C is answered like SLURM's warning
(``last.ckpt`` at the next step boundary, exit status 0); a second one, while the current step still
runs, stops at once through Lightning's ``KeyboardInterrupt`` shutdown ("Detected KeyboardInterrupt,
attempting graceful shutdown", exit status 1, nothing saved). Without ``SIGINT`` in ``signals``,
every Ctrl-C takes that second path. Either way it is answered only between two Python operations:
one long tensor operation (a bf16 matmul on a CPU without bf16 units) delays it until it returns.
"""
import os
import re
import signal
import subprocess
import threading
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_info

from ssl_vit.data.workers import register_main_process_signals, unregister_main_process_signals
from ssl_vit.training.checkpoint import Checkpoint

SCONTROL_TIMEOUT_S = 30


def slurm_job_id() -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` in a job array, else ``SLURM_JOB_ID``."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):
        raise RuntimeError(f"Preemption: cannot requeue: SLURM_JOB_ID {job_id!r} is not a SLURM job id")
    return job_id


def requeue_slurm_job(job_id: str) -> None:
    """Run ``scontrol requeue <job_id>``; raise ``RuntimeError`` naming the command when it fails."""
    command = ["scontrol", "requeue", job_id]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(
            f"Preemption: `{' '.join(command)}` could not run ({error}); the job is not requeued"
        ) from error
    if result.returncode != 0:
        raise RuntimeError(
            f"Preemption: `{' '.join(command)}` failed with exit status {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()}; the job is not requeued"
        )


def _signal_number(name: str) -> signal.Signals:
    number = getattr(signal.Signals, str(name).upper(), None)
    if number is None or number in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"Preemption: signals: {name!r} is not a signal that can be handled (e.g. 'SIGUSR1')")
    return number


def _cluster_environment(trainer: "pl.Trainer") -> Any:
    """The cluster environment Lightning's signal connector reads (a single-device strategy has none
    of its own, yet Lightning installs its SLURM handler for it all the same)."""
    return trainer._accelerator_connector.cluster_environment


class Preemption(pl.Callback):
    """On a signal (SLURM's warning), save ``last.ckpt`` at the next agreed step boundary, requeue
    the SLURM job and stop the run (see the module docstring).

    The run needs a :class:`~ssl_vit.training.checkpoint.Checkpoint` with ``save_last=True`` (the
    resume point): every such callback writes its ``last.ckpt``.

    Args:
        signals: signal names to act on. ``SIGTERM`` (what SLURM sends when it ends a job, followed
            by SIGKILL after ``KillWait``, often 30 s) needs ``check_every=1``: Lightning's own
            SIGTERM handling, which cannot be turned off, ends the run at the end of the step
            in which SIGTERM arrived.
        check_every: with several processes, agree on the signal every this many optimiser steps
            (a one-element all-reduce, i.e. a host sync). One process checks every step.
        requeue: run ``scontrol requeue`` when the run is a SLURM job (Lightning's
            ``SLURMEnvironment``); ``False`` only saves and stops (a cluster that requeues
            preempted jobs itself). Outside SLURM the run only saves and stops.
    """

    def __init__(self, signals: Optional[List[str]] = None, check_every: int = 10, requeue: bool = True) -> None:
        super().__init__()
        names = ["SIGUSR1"] if signals is None else list(signals)
        if not names:
            raise ValueError("Preemption: signals is empty; name at least one (e.g. ['SIGUSR1'])")
        self.signals = [_signal_number(name) for name in names]
        if check_every < 1:
            raise ValueError(f"Preemption: check_every must be >= 1, got {check_every}")
        if signal.SIGTERM in self.signals and check_every != 1:
            raise ValueError(
                f"Preemption: SIGTERM needs check_every=1, got {check_every}: Lightning ends the run at the end "
                "of the step in which SIGTERM arrived, before a later check could save"
            )
        self.check_every, self.requeue = check_every, requeue
        self.received: Optional[int] = None  # written by the signal handler only
        self.saved: List[str] = []  # the files written on the signal
        self._original: Dict[int, Any] = {}  # the handlers before the fit
        self._active = False
        self._checkpoints: List[Checkpoint] = []
        self._checked_step = -1
        self._acted = False

    def _handler(self, signum: int, frame: Any) -> None:
        """The signal handler: during a fit it records the signal, nothing else (see the module
        docstring). After a fit that raised, Lightning's own clean-up puts this handler back (it
        restores what it found when the fit started, after ``on_exception`` restored the original):
        then it hands the signal to the original handler (or default action) for good."""
        if self._active:
            if signum == signal.SIGINT and self.received == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now (Lightning's shutdown), unsaved
            self.received = signum
            if signum == signal.SIGINT:
                rank_zero_info("Preemption: Ctrl-C: stopping at the end of this step (press again to stop now)")
            return
        signal.signal(signum, self._original.get(signum, signal.SIG_DFL))
        signal.raise_signal(signum)

    # -- set-up and tear-down --------------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        environment = _cluster_environment(trainer)
        lightning_acts = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        if lightning_acts and environment.requeue_signal in self.signals:
            raise ValueError(
                "Preemption: Lightning's SLURMEnvironment(auto_requeue=True) would also handle "
                f"{signal.Signals(environment.requeue_signal).name}, saving from inside the signal handler; "
                "turn it off with "
                "--trainer.plugins '{\"class_path\": \"pytorch_lightning.plugins.environments.SLURMEnvironment\", "
                "\"init_args\": {\"auto_requeue\": false}}' (recipes/slurm/pretrain.sbatch does)"
            )
        if sum(isinstance(c, Preemption) for c in trainer.callbacks) > 1:
            raise ValueError(
                "Preemption: the run has several Preemption callbacks (the recipe's and the sbatch "
                "template's?); keep one"
            )
        self._checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, Checkpoint) and c.save_last]
        if not self._checkpoints:
            raise ValueError(
                "Preemption: the run has no ssl_vit.training.Checkpoint with save_last=true, so there is no "
                "last.ckpt to resume from; add one to trainer.callbacks"
            )
        if trainer.fit_loop.min_epochs or trainer.fit_loop.min_steps:
            raise ValueError(
                "Preemption: trainer.min_epochs / min_steps are set: Lightning ignores should_stop until they are "
                "reached, so the run could not stop after saving; remove them"
            )
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Preemption: signal handlers can only be set in the main thread; call fit there")
        self.received, self.saved, self._acted = None, [], False
        for number in self.signals:
            previous = signal.signal(number, self._handler)
            if previous != self._handler:  # ours: left by Lightning after a failed fit, the original is known
                self._original[number] = signal.SIG_DFL if previous is None else previous
        register_main_process_signals(self.signals)  # DataLoader workers built from now on ignore them
        self._active = True

    def _restore_handlers(self) -> None:
        if self._active:
            unregister_main_process_signals(self.signals)
        self._active = False
        for number, handler in self._original.items():
            signal.signal(number, handler)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._restore_handlers()  # Lightning calls no teardown hook after an exception

    # -- the check, at step boundaries -------------------------------------------------------------
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._checked_step = trainer.global_step  # the next check follows the next optimiser step

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._acted or step == self._checked_step:  # no optimiser step in this batch (accumulation)
            return
        self._checked_step = step
        if trainer.world_size > 1 and step % self.check_every:
            return
        # every rank reaches this at the same step: the same decision everywhere
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            self._act(trainer)

    def _act(self, trainer: "pl.Trainer") -> None:
        self._acted = True
        name = signal.Signals(self.received).name if self.received is not None else "another rank's signal"
        rank_zero_info(f"Preemption: {name}: saving last.ckpt at step {trainer.global_step}, then stopping")
        self.saved = [checkpoint.save_last_now(trainer) for checkpoint in self._checkpoints]
        trainer.should_stop = True
        environment = _cluster_environment(trainer)
        slurm_job = isinstance(environment, SLURMEnvironment) or SLURMEnvironment.detect()
        if self.requeue and trainer.is_global_zero and slurm_job:
            job_id = slurm_job_id()
            requeue_slurm_job(job_id)  # only once the checkpoint is in place: SLURM may kill us from now on
            rank_zero_info(f"Preemption: requeued SLURM job {job_id}; resume with --ckpt_path last")
