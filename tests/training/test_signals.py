"""Signals sent to the whole process group of a run with DataLoader workers, as SLURM (``scancel``,
preemption, the time limit) and a terminal's Ctrl-C send them: the workers must outlive the main
process's orderly stop instead of dying first and taking the run down with them.

Each run is ``python -m ssl_vit fit`` (the DINO smoke recipe, 2 workers) in a session of its own,
signalled by itself at a step boundary through ``os.killpg`` (``dist_callbacks.SignalAtStep``); a
run that hangs is killed after ``TIMEOUT`` s.

The in-process tests: Preemption registers its signals for the workers only while it is set up, and
a second Ctrl-C stops at once.
"""
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from dist_helpers import ROOT, Shards, clean_env, run_in_own_session, write_indexed_shards
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.demos.boring_classes import BoringModel

from ssl_vit.checkpoints.io import safe_torch_load
from ssl_vit.data.workers import main_process_signals
from ssl_vit.training import Checkpoint, Preemption


SMOKE = str(ROOT / "ssl_vit" / "recipes" / "smoke" / "dino.yaml")
TIMEOUT = 180
SIGNAL_AT, TOTAL = 2, 8  # 16 samples, batch 4, 2 workers: 4 batches per epoch
STOP = SIGNAL_AT + 1  # the signal comes inside step 3, after the optimiser's update: the step boundary after it
REST_OF_STEP = 2.0  # seconds the signalled step goes on (a real step is long; the workers die meanwhile)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Shards:
    return write_indexed_shards(tmp_path_factory.mktemp("signal_data"), num_samples=16, shard_size=4)


def callback(class_path: str, **init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})


def fit_in_own_session(args: List[str]) -> subprocess.CompletedProcess:
    """``python -m ssl_vit fit ARGS`` as a process group leader (killed with its group on a timeout)."""
    return run_in_own_session([sys.executable, "-m", "ssl_vit", "fit", *args], clean_env(OMP_NUM_THREADS="1"), TIMEOUT)


def run_args(shards: Shards, tmp: Path, name: str, preemption: bool, checkpoint: bool = True) -> List[str]:
    args = [
        "--config", SMOKE, "--data.train", shards.pattern, "--data.num_workers", "2",
        "--trainer.max_steps", str(TOTAL), "--trainer.max_epochs", "-1", "--trainer.default_root_dir", str(tmp),
        callback("dist_callbacks.SignalAtStep", step=SIGNAL_AT, signal=name, group=True,
                 when="after_optimizer_step", rest_of_step=REST_OF_STEP),
    ]
    if checkpoint:
        args.append(callback("ssl_vit.training.Checkpoint", dirpath=str(tmp / "ckpt"), every_n_train_steps=100))
    if preemption:
        args.append(callback("ssl_vit.training.Preemption", signals=[name], check_every=1))
    return args


@pytest.mark.slow  # CLI training in a subprocess
@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_preemption_signal_to_the_process_group_saves_and_ends_the_run_cleanly(name, shards, tmp_path):
    """Preemption on SIGTERM / SIGUSR1 / SIGINT: ``last.ckpt`` at the signal's step, exit status 0,
    and no worker killed by the signal on the way."""
    result = fit_in_own_session(run_args(shards, tmp_path, name, preemption=True))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "killed by signal" not in output and "Traceback" not in output, output[-4000:]
    assert f"Preemption: {name}: saving last.ckpt at step {STOP}" in output
    saved = safe_torch_load(tmp_path / "ckpt" / "last.ckpt")
    assert saved["global_step"] == STOP


@pytest.mark.slow
def test_ctrl_c_in_a_run_that_keeps_checkpoints_saves_without_configuring_preemption(shards, tmp_path):
    """A run with a resume Checkpoint and no Preemption: the CLI answers Ctrl-C by saving last.ckpt
    at the step boundary (exit status 0), the workers quiet."""
    result = fit_in_own_session(run_args(shards, tmp_path, "SIGINT", preemption=False))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "killed by signal" not in output and "Traceback" not in output, output[-4000:]
    assert safe_torch_load(tmp_path / "ckpt" / "last.ckpt")["global_step"] == STOP


@pytest.mark.slow
def test_ctrl_c_without_checkpoints_ends_through_lightnings_shutdown_without_worker_tracebacks(shards, tmp_path):
    """Ctrl-C in a run that keeps no checkpoint (so no Preemption either): Lightning's graceful
    shutdown (exit status 1), and the workers, which used to die of the signal each with its own
    KeyboardInterrupt traceback, stay quiet until the main process shuts them down."""
    result = fit_in_own_session(run_args(shards, tmp_path, "SIGINT", preemption=False, checkpoint=False))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    assert "Detected KeyboardInterrupt, attempting graceful shutdown" in output
    assert "killed by signal" not in output and "Traceback" not in output, output[-4000:]


class SeenSignals(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.seen = main_process_signals()


def test_preemption_registers_its_signals_for_the_workers_while_set_up(tmp_path):
    seen = SeenSignals()
    trainer = Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), accelerator="cpu", devices=1,
                      callbacks=[Preemption(signals=["SIGTERM", "SIGUSR2"], check_every=1),
                                 Checkpoint(dirpath=str(tmp_path / "ckpt")), seen])
    assert signal.SIGTERM not in main_process_signals()
    trainer.fit(BoringModel())
    assert {signal.SIGTERM, signal.SIGUSR2, signal.SIGINT, signal.SIGUSR1} <= set(seen.seen)
    assert signal.SIGTERM not in main_process_signals() and signal.SIGUSR2 not in main_process_signals()


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """The first Ctrl-C is recorded (a save at the step boundary follows); a second one during the
    same step raises KeyboardInterrupt, which Lightning turns into its shutdown."""
    preemption = Preemption(signals=["SIGINT"], check_every=1)
    preemption._active = True  # as between setup and teardown
    preemption._handler(signal.SIGINT, None)
    assert preemption.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        preemption._handler(signal.SIGINT, None)
