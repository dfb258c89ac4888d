"""The SLURM template (recipes/slurm/pretrain.sbatch) and the preemption path
(:class:`ssl_vit.training.Preemption`), for real, on CPU.

The template runs under bash with a fake SLURM: the variables ``srun`` would set for one task, an
``srun`` that runs its command, and an ``scontrol`` that records its arguments and a copy of the
``last.ckpt`` that exists when it is called. SIGUSR1 (what ``#SBATCH --signal=SIGUSR1@90`` sends) is
raised from inside a DINO training step, right after the AdamW update and before the teacher EMA and
before ``global_step`` counts the step, and sent to the DataLoader workers too, as SLURM does. The
run must write ``last.ckpt`` at the next step boundary, call ``scontrol requeue <job id>`` after
that, stop and exit 0; the requeued job (same command, same job id, ``SLURM_RESTART_COUNT=1``) must
end with the same weights and optimiser state, bit for bit, as a run never interrupted.
A control: Lightning's own handler saves in the middle of that step, and a run resumed from its file
ends elsewhere. A 2-task job where only rank 1 is signalled: both ranks save and stop at the same
step (with each rank deciding alone, that run hangs in mismatched collectives).
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from dist_helpers import ROOT, Shards, clean_env, free_port, run_in_own_session, write_indexed_shards
from dist_helpers import one_thread  # noqa: F401 (a fixture)

from ssl_vit.checkpoints.io import safe_torch_load
from ssl_vit.cli import main as cli_main
from ssl_vit.cli import run_lightning
from ssl_vit.training import Checkpoint, Preemption

pytestmark = pytest.mark.slow  # processes, CLI training or end-to-end chains: `make test` only

TEMPLATE = ROOT / "ssl_vit" / "recipes" / "slurm" / "pretrain.sbatch"
SMOKE = str(ROOT / "ssl_vit" / "recipes" / "smoke" / "dino.yaml")
JOB_ID = "4242"
TIMEOUT = 300
SIGNAL_AT, STOP, TOTAL = 2, 3, 6  # the signal inside step 3 (global_step 2 -> 3); 2 batches per epoch
NO_REQUEUE = json.dumps({"class_path": "pytorch_lightning.plugins.environments.SLURMEnvironment",
                         "init_args": {"auto_requeue": False}})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Shards:
    return write_indexed_shards(tmp_path_factory.mktemp("slurm_data"), num_samples=8, shard_size=4)


@pytest.fixture
def fake_slurm(tmp_path) -> Path:
    """A folder with fake ``srun`` and ``scontrol`` executables (put it first on PATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')  # one task: run the command itself
    (bin_dir / "scontrol").write_text(  # records the call and the last.ckpt in place at that moment
        '#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n'
        'if [ -n "$SCONTROL_SNAPSHOT" ]; then cp "$SCONTROL_SNAPSHOT" "$SCONTROL_LOG.ckpt"; fi\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def slurm_vars(nodes: int = 1, tasks_per_node: int = 1) -> Dict[str, str]:
    """What sbatch + srun set for task 0 of a job (only what Lightning and the template read)."""
    return dict(
        SLURM_JOB_ID=JOB_ID, SLURM_JOB_NAME="ssl_vit_test", SLURM_SUBMIT_DIR=str(ROOT),
        SLURM_NTASKS=str(nodes * tasks_per_node), SLURM_NTASKS_PER_NODE=str(tasks_per_node),
        SLURM_NNODES=str(nodes), SLURM_JOB_NUM_NODES=str(nodes), SLURM_NODELIST="localhost",
        SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
    )


def slurm_env(tmp_path: Path, bin_dir: Path, nodes: int = 1, tasks_per_node: int = 1, **extra: str) -> Dict[str, str]:
    # one thread in the subprocesses as in this process (one_thread): the same arithmetic in both
    env = clean_env(**slurm_vars(nodes, tasks_per_node), PYTHON=sys.executable, OMP_NUM_THREADS="1",
                    SCONTROL_LOG=str(tmp_path / "scontrol.log"), **extra)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def sbatch(args: List[str], env: Dict[str, str]) -> subprocess.CompletedProcess:
    """Run the template as the batch step would (``bash pretrain.sbatch ARGS``), in a session of its
    own: on a timeout (a hung run) every process it started is killed, as SLURM would."""
    return run_in_own_session(["bash", str(TEMPLATE), *args], env, TIMEOUT)


def callback(class_path: str, **init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})


def adamw_steps(checkpoint: dict) -> int:
    """The optimiser steps AdamW has taken, from its state (the most any parameter took: DINO's
    last layer is frozen, without gradients, during its first epoch)."""
    return max(int(s["step"]) for s in checkpoint["optimizer_states"][0]["state"].values())


def loop_counts(checkpoint: dict) -> tuple:
    """``(batches fetched, batches processed, optimiser steps completed)`` in Lightning's loop state."""
    loop = checkpoint["loops"]["fit_loop"]
    batches = loop["epoch_loop.batch_progress"]["total"]
    steps = loop["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"]["total"]
    return batches["ready"], batches["processed"], steps["completed"]


def assert_same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")


# -- the template ---------------------------------------------------------------------------------
def test_template_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(TEMPLATE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    options = [line.split()[1].lstrip("-") for line in TEMPLATE.read_text().splitlines() if line.startswith("#SBATCH")]
    directives = dict((option + "=").split("=")[:2] for option in options)  # "requeue" -> ("requeue", "")
    assert directives["signal"] == "SIGUSR1@90" and "requeue" in directives
    assert directives["ntasks-per-node"] == directives["gres"].split(":")[-1]  # one task per GPU
    assert directives["job-name"] not in ("bash", "interactive")  # names for which Lightning ignores SLURM


def test_template_runs_the_cli_with_preemption_and_resumes_requeued_jobs(fake_slurm, tmp_path, capsys):
    """What the template hands to srun: the CLI with num_nodes and devices from the allocation,
    Lightning's requeue handler off, the Preemption callback, the user's overrides; a requeued job
    adds ``--ckpt_path last``; and that command line parses (``--print_config``)."""
    srun_cpus = fake_slurm / "srun_cpus"  # print, do not run; record the cores srun would give each task
    (fake_slurm / "srun").write_text(f'#!/bin/sh\necho "$SRUN_CPUS_PER_TASK" > {srun_cpus}\nprintf "%s\\n" "$WANDB_RUN_ID" "$@"\n')
    env = slurm_env(tmp_path, fake_slurm, nodes=3, tasks_per_node=4, CHECK_EVERY="7", SLURM_CPUS_PER_TASK="10")
    result = sbatch([SMOKE, "--data.batch_size", "2"], env)
    assert result.returncode == 0, result.stderr
    run_id, *argv = result.stdout.splitlines()
    assert run_id == f"ssl_vit_test-{JOB_ID}"  # a requeued job continues the same wandb run
    assert srun_cpus.read_text().strip() == "10"  # srun (Slurm >= 22.05) does not inherit --cpus-per-task
    preemption = {"class_path": "ssl_vit.training.Preemption", "init_args": {"check_every": 7}}
    assert argv == [
        sys.executable, "-m", "ssl_vit", "fit", "--config", SMOKE, "--trainer.num_nodes", "3",
        "--trainer.devices", "4", f"--trainer.plugins+={NO_REQUEUE}", argv[11], "--data.batch_size", "2",
    ]
    assert argv[11].startswith("--trainer.callbacks+=") and json.loads(argv[11].split("=", 1)[1]) == preemption
    requeued = sbatch([SMOKE, "--data.batch_size", "2"], dict(env, SLURM_RESTART_COUNT="1")).stdout.splitlines()[1:]
    assert requeued == argv[:12] + ["--ckpt_path", "last"] + argv[12:]  # before the user's: theirs win
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*requeued[3:], "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["num_nodes"] == 3 and str(config["trainer"]["devices"]) == "4"  # Lightning parses "4"
    no_requeue = {**json.loads(NO_REQUEUE), "init_args": {"auto_requeue": False, "requeue_signal": None}}
    assert config["trainer"]["plugins"] == [no_requeue]
    assert config["trainer"]["callbacks"][-1]["class_path"] == "ssl_vit.training.Preemption"
    assert config["trainer"]["callbacks"][-1]["init_args"]["check_every"] == 7
    assert config["data"]["init_args"]["batch_size"] == 2 and config["ckpt_path"] == "last"


# -- the preemption path, for real ----------------------------------------------------------------
def fit_overrides(shards: Shards, tmp: Path, workers: int = 2) -> List[str]:
    """The DINO smoke recipe on the test shards for TOTAL steps, checkpointed every 2 steps into
    ``tmp/ckpt`` (regular saves at steps 2, 4, 6: the signal's step 3 is not one of them)."""
    return [
        "--data.train", shards.pattern, "--data.num_workers", str(workers), "--trainer.max_steps", str(TOTAL),
        "--trainer.max_epochs", "-1", "--trainer.default_root_dir", str(tmp),
        callback("ssl_vit.training.Checkpoint", dirpath=str(tmp / "ckpt"), every_n_train_steps=2, keep_last=1),
    ]


def test_sigusr1_mid_step_saves_at_the_step_boundary_requeues_and_the_requeued_job_resumes_exactly(
    shards, fake_slurm, tmp_path
):
    run, steps_log = tmp_path / "run", tmp_path / "steps.log"
    env = slurm_env(tmp_path, fake_slurm, SCONTROL_SNAPSHOT=str(run / "ckpt" / "last.ckpt"))
    common = [SMOKE, *fit_overrides(shards, run), callback("dist_callbacks.StepLog", path=str(steps_log))]
    signal_mid_step = callback("dist_callbacks.SignalAtStep", step=SIGNAL_AT, signal="SIGUSR1",
                               when="after_optimizer_step", workers=True)

    first = sbatch([*common, signal_mid_step], env)
    assert first.returncode == 0, first.stderr[-4000:]  # stopped by itself, cleanly
    assert steps_log.read_text().splitlines() == ["start 0", f"end {STOP}"]  # no step after the signal's
    assert (tmp_path / "scontrol.log").read_text().splitlines() == [f"requeue {JOB_ID}"]
    at_requeue = safe_torch_load(tmp_path / "scontrol.log.ckpt")  # complete before the requeue
    saved = safe_torch_load(run / "ckpt" / "last.ckpt")
    for checkpoint in (at_requeue, saved):  # a step boundary: every part of it counts STOP steps
        assert checkpoint["global_step"] == adamw_steps(checkpoint) == STOP
        assert loop_counts(checkpoint) == (STOP, STOP, STOP)
    assert_same(at_requeue["state_dict"], saved["state_dict"])
    assert not list(run.rglob("hpc_ckpt_*")) and not list(ROOT.glob("hpc_ckpt_*"))  # Lightning's handler is off
    assert "Preemption: SIGUSR1: saving last.ckpt at step 3" in first.stderr + first.stdout

    second = sbatch(common, dict(env, SLURM_RESTART_COUNT="1", SCONTROL_SNAPSHOT=""))  # the requeued job
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"Restoring states from the checkpoint path at {run / 'ckpt' / 'last.ckpt'}" in second.stdout + second.stderr
    assert steps_log.read_text().splitlines() == ["start 0", f"end {STOP}", f"start {STOP}", f"end {TOTAL}"]
    assert (tmp_path / "scontrol.log").read_text().splitlines() == [f"requeue {JOB_ID}"]  # no second requeue
    resumed = safe_torch_load(run / "ckpt" / "last.ckpt")
    assert resumed["global_step"] == adamw_steps(resumed) == TOTAL

    straight = tmp_path / "straight"  # the run never interrupted, in this process
    cli = run_lightning(["fit", "--config", SMOKE, *fit_overrides(shards, straight)])
    assert cli.trainer.global_step == TOTAL
    expected = safe_torch_load(straight / "ckpt" / "last.ckpt")
    assert_same(expected["state_dict"], resumed["state_dict"])  # student, EMA teacher, DINO centre
    expected_adamw, resumed_adamw = (c["optimizer_states"][0]["state"] for c in (expected, resumed))
    assert expected_adamw.keys() == resumed_adamw.keys()
    for key in expected_adamw:
        assert_same(expected_adamw[key], resumed_adamw[key])  # AdamW moments and step counts


@pytest.mark.parametrize("handler", ["Preemption", "Preemption on SIGTERM", "Lightning"])
def test_where_the_signal_handler_saves(handler, shards, fake_slurm, tmp_path, monkeypatch):
    """The same mid-step signal in this process. Preemption outside SLURM: last.ckpt at the step
    boundary, the run stopped there, no scontrol; on SIGTERM too, which Lightning also handles (it
    ends the run with SIGTERMException after that step). The control, Lightning's SLURM handler
    (``auto_requeue=True``): it saves from inside the step, where AdamW has taken one step more
    than ``global_step`` counts, lets the run go on, and a run resumed from that file does not end
    where the uninterrupted run does."""
    monkeypatch.setenv("PATH", f"{fake_slurm}:{os.environ['PATH']}")
    monkeypatch.setenv("SCONTROL_LOG", str(tmp_path / "scontrol.log"))
    monkeypatch.delenv("SCONTROL_SNAPSHOT", raising=False)
    name = "SIGTERM" if "SIGTERM" in handler else "SIGUSR1"
    args = ["fit", "--config", SMOKE, *fit_overrides(shards, tmp_path, workers=0),
            callback("dist_callbacks.SignalAtStep", step=SIGNAL_AT, signal=name, when="after_optimizer_step")]
    if handler.startswith("Preemption"):
        preemption = callback("ssl_vit.training.Preemption", signals=[name], check_every=1)
        if name == "SIGTERM":
            with pytest.raises(SystemExit):  # Lightning's SIGTERMException, after our save
                run_lightning([*args, preemption])
        else:
            cli = run_lightning([*args, preemption])
            assert cli.trainer.global_step == STOP and cli.trainer.should_stop
        saved = safe_torch_load(tmp_path / "ckpt" / "last.ckpt")
        assert saved["global_step"] == adamw_steps(saved) == STOP and loop_counts(saved) == (STOP, STOP, STOP)
        assert not (tmp_path / "scontrol.log").exists()  # not a SLURM job: saved and stopped, no requeue
        handler = signal.getsignal(getattr(signal, name))  # the original, or ours handing signals to it
        assert handler == signal.SIG_DFL or (name == "SIGTERM" and not handler.__self__._active)
        return
    for name, value in slurm_vars().items():
        monkeypatch.setenv(name, value)
    cli = run_lightning(args)
    assert cli.trainer.global_step == TOTAL  # it requeued, then went on training
    assert (tmp_path / "scontrol.log").read_text().splitlines() == [f"requeue {JOB_ID}"]
    hpc = safe_torch_load(tmp_path / "hpc_ckpt_1.ckpt")
    assert hpc["global_step"] == SIGNAL_AT and adamw_steps(hpc) == SIGNAL_AT + 1  # no step boundary
    assert loop_counts(hpc) == (STOP, STOP - 1, SIGNAL_AT)
    # and a run resumed from it does not end where the uninterrupted run does
    resumed = run_lightning(["fit", "--config", SMOKE, *fit_overrides(shards, tmp_path / "resumed", workers=0),
                             "--ckpt_path", str(tmp_path / "hpc_ckpt_1.ckpt")])
    straight = run_lightning(["fit", "--config", SMOKE, *fit_overrides(shards, tmp_path / "straight", workers=0)])
    assert resumed.trainer.global_step == straight.trainer.global_step == TOTAL
    a, b = resumed.model.state_dict(), straight.model.state_dict()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) > 1e-4


def test_preemption_refuses_what_would_break_it(monkeypatch, tmp_path):
    """Bad settings fail with a message naming them: Lightning's handler still on, no resume
    checkpoint, bad signal names or check intervals."""
    from pytorch_lightning import Trainer
    from pytorch_lightning.demos.boring_classes import BoringModel
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    for name, value in slurm_vars().items():
        monkeypatch.setenv(name, value)
    common = dict(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir=str(tmp_path), accelerator="cpu", devices=1)
    resume = Checkpoint(dirpath=str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="auto_requeue"):  # Lightning detects SLURM: auto_requeue=True
        Trainer(callbacks=[Preemption(), resume], **common).fit(BoringModel())
    with pytest.raises(ValueError, match="no ssl_vit.training.Checkpoint with save_last"):
        Trainer(callbacks=[Preemption(), Checkpoint(dirpath=str(tmp_path / "ckpt"), save_last=False)],
                plugins=[SLURMEnvironment(auto_requeue=False)], **common).fit(BoringModel())
    with pytest.raises(ValueError, match="several Preemption"):
        Trainer(callbacks=[Preemption(), Preemption(), resume], plugins=[SLURMEnvironment(auto_requeue=False)],
                **common).fit(BoringModel())
    with pytest.raises(ValueError, match="'SIGFOO'"):
        Preemption(signals=["SIGFOO"])
    with pytest.raises(ValueError, match="check_every must be >= 1"):
        Preemption(check_every=0)
    with pytest.raises(ValueError, match="SIGTERM needs check_every=1"):
        Preemption(signals=["SIGUSR1", "SIGTERM"], check_every=10)


# -- two ranks ------------------------------------------------------------------------------------
def test_two_ranks_stop_together_when_only_rank_1_was_signalled(shards, fake_slurm, tmp_path):
    """A 2-task job (gloo DDP, one node) through the template: only rank 1 gets SIGUSR1, inside step
    3. The ranks compare notes every CHECK_EVERY=2 steps, so both save at step 4 (one checkpoint,
    both ranks' RNG states), rank 0 alone requeues, and both stop at step 4 and exit 0."""
    (fake_slurm / "srun").write_text(  # one task per SLURM_NTASKS, each with its rank, as srun does
        '#!/bin/bash\npids=()\nfor ((i = 0; i < SLURM_NTASKS; i++)); do\n'
        '  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "$SRUN_LOG.$i" 2>&1 &\n  pids+=($!)\ndone\n'
        'rc=0\nfor p in "${pids[@]}"; do wait "$p" || rc=$?; done\nexit $rc\n'
    )
    run, record = tmp_path / "run", tmp_path / "record"
    env = slurm_env(tmp_path, fake_slurm, tasks_per_node=2, CHECK_EVERY="2", MASTER_PORT=str(free_port()),
                    SRUN_LOG=str(tmp_path / "task"))
    result = sbatch([SMOKE, *fit_overrides(shards, run, workers=0),
                     callback("dist_callbacks.Recorder", folder=str(record)),
                     callback("dist_callbacks.SignalAtStep", step=SIGNAL_AT, when="after_optimizer_step", rank=1)], env)
    logs = [(tmp_path / f"task.{rank}").read_text() for rank in range(2)]
    assert result.returncode == 0, result.stderr[-2000:] + logs[0][-3000:] + logs[1][-3000:]
    records = [torch.load(record / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert [(r["rank"], r["world_size"], r["environment"]) for r in records] == [
        (0, 2, "SLURMEnvironment"), (1, 2, "SLURMEnvironment")]
    assert [r["end_step"] for r in records] == [4, 4]  # the first agreed check after the signal
    assert "Preemption: another rank's signal: saving last.ckpt at step 4" in logs[0]  # rank 0 had none
    assert (tmp_path / "scontrol.log").read_text().splitlines() == [f"requeue {JOB_ID}"]  # rank 0 only
    saved = safe_torch_load(run / "ckpt" / "last.ckpt")
    assert saved["global_step"] == adamw_steps(saved) == 4 and len(saved["rng_states"]) == 2
    for key in records[0]["params_end"]:
        assert torch.equal(records[0]["params_end"][key], records[1]["params_end"][key]), key


def test_signals_go_back_to_the_original_handler_after_a_failed_fit(tmp_path):
    """After a fit that raised, Lightning's clean-up re-installs the handler it found at the start
    (ours): the next signal reaches the original handler again, which stays installed."""
    from pytorch_lightning import Callback, Trainer
    from pytorch_lightning.demos.boring_classes import BoringModel

    class Crash(Callback):
        def on_train_batch_end(self, *args):
            raise RuntimeError("crash")

    seen: List[int] = []
    original = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        trainer = Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=str(tmp_path), accelerator="cpu", devices=1,
                          callbacks=[Preemption(), Checkpoint(dirpath=str(tmp_path / "ckpt")), Crash()])
        with pytest.raises(RuntimeError, match="crash"):
            trainer.fit(BoringModel())
        signal.raise_signal(signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
        signal.raise_signal(signal.SIGUSR1)
        assert seen == [signal.SIGUSR1] * 2 and signal.getsignal(signal.SIGUSR1) is not None
        assert not hasattr(signal.getsignal(signal.SIGUSR1), "__self__")  # not ours any more
    finally:
        signal.signal(signal.SIGUSR1, original)
