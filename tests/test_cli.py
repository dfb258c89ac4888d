"""The `ssl-vit` entry point: strict recipes, --print_config, the saved config, `python -m ssl_vit`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ssl_vit.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "ssl_vit" / "recipes" / "smoke" / "mae.yaml")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("cli_images")
    rng = np.random.default_rng(0)
    for i in range(8):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return str(root)


def _folder_data(folder: str) -> list:
    return ["--data", "ssl_vit.data.ImageFolderDataModule", "--data.train", folder, "--data.batch_size", "4",
            "--data.num_workers", "0", "--data.pin_memory", "false",
            "--data.train_transform", "ssl_vit.data.PretrainTransform", "--data.train_transform.size", "32"]


def test_print_config_resolves_the_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", SMOKE, "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "ssl_vit.methods.mae.MAE"
    assert config["model"]["init_args"]["mask_ratio"] == 0.75
    assert config["model"]["init_args"]["decoder_depth"] == 1
    # defaults the recipe does not set are filled in
    assert config["model"]["init_args"]["betas"] == [0.9, 0.95]


@pytest.mark.parametrize("bad", [["--model.init_args.mask_rato", "0.5"], ["--trainer.max_epocs", "3"]])
def test_unknown_key_fails_at_start_naming_the_key(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", SMOKE, *bad])
    assert exit_info.value.code != 0
    key = bad[0].split(".")[-1]
    assert key in capsys.readouterr().err


def test_unknown_key_inside_a_recipe_file_is_named(tmp_path, capsys):
    recipe = yaml.safe_load(Path(SMOKE).read_text())
    recipe["model"]["init_args"]["decoder_widht"] = 64
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(path)])
    assert "decoder_widht" in capsys.readouterr().err


def test_fit_saves_the_resolved_config_in_the_run_directory(folder, tmp_path):
    # (not fast_dev_run: LightningCLI saves no config in that mode)
    cli_main(["fit", "--config", SMOKE, *_folder_data(folder), "--trainer.max_steps", "1",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", "[]"])
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "ssl_vit.methods.mae.MAE"
    assert saved["data"]["init_args"]["train"] == folder
    assert saved["trainer"]["default_root_dir"] == str(tmp_path)


@pytest.mark.slow
def test_python_dash_m_runs_the_cli():
    env = dict(os.environ, WANDB_MODE="offline")
    result = subprocess.run([sys.executable, "-m", "ssl_vit", "fit", "--help"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout and "--trainer" in result.stdout


def test_starting_the_cli_opens_no_connection(monkeypatch):
    """wandb follows WANDB_MODE on its own: ssl-vit probes no server at start (every rank used to)."""
    import socket

    opened = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: opened.append(a) or pytest.fail("network"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--help"])
    assert exit_info.value.code == 0 and opened == []
    assert "WANDB_MODE" not in os.environ


def test_the_guard_and_the_start_up_checks_are_configurable_sections(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--nonfinite.policy" in out and "--nonfinite.max_skipped_steps" in out and "ssl_vit.training.StartupChecks" in out


@pytest.mark.slow
def test_the_apps_commands_share_the_entry_point():
    result = subprocess.run([sys.executable, "-m", "ssl_vit", "demo", "--help"], capture_output=True, text=True,
                            env=dict(os.environ, WANDB_MODE="offline"), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "--output" in result.stdout


def test_abbreviated_keys_are_refused(capsys):
    """argparse would take ``--trainer.max_step`` for ``--trainer.max_steps`` silently."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", SMOKE, "--trainer.max_step", "3", "--print_config"])
    assert exit_info.value.code != 0
    assert "unrecognized arguments: --trainer.max_step 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", SMOKE, "--trainer.max_steps", "3", "--print_config"])
    assert exit_info.value.code in (0, None) and "max_steps: 3" in capsys.readouterr().out


def test_top_level_help_lists_the_apps_commands(capsys):
    from ssl_vit.apps.commands import main as ssl_vit_main

    ssl_vit_main(["--help"])
    out = capsys.readouterr().out
    assert "demo" in out and "fit" in out and "validate" in out and "make-shards" in out


def test_recipes_bf16_becomes_fp32_on_a_cpu_unless_insisted(folder, tmp_path, capsys):
    """A recipe's bf16-mixed on a device without fast bf16 trains in fp32 and says so in one line;
    --trainer.precision on the command line is obeyed as given."""
    from ssl_vit.cli import has_fast_bf16, precision_for_device, run_lightning

    assert not has_fast_bf16("cpu")
    assert precision_for_device("bf16-mixed", "cpu", explicit=False) == "32-true"
    assert precision_for_device("bf16-mixed", "cpu", explicit=True) == "bf16-mixed"
    assert precision_for_device("16-mixed", "cpu", explicit=False) == "16-mixed"
    recipe = yaml.safe_load(Path(SMOKE).read_text())
    recipe["trainer"]["precision"] = "bf16-mixed"
    path = tmp_path / "bf16.yaml"
    path.write_text(yaml.safe_dump(recipe))
    args = ["fit", "--config", str(path), *_folder_data(folder), "--trainer.fast_dev_run", "1",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", "[]"]
    cli = run_lightning(args)
    assert cli.trainer.precision == "32-true"
    assert "no fast bf16: training in fp32" in capsys.readouterr().err
    cli = run_lightning(args + ["--trainer.precision", "bf16-mixed"])
    assert cli.trainer.precision == "bf16-mixed"


def test_a_user_error_is_one_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    from ssl_vit.apps.commands import main as ssl_vit_main

    monkeypatch.delenv("SSL_VIT_TRACEBACK", raising=False)
    args = ["fit", "--config", SMOKE, "--data.train", str(tmp_path / "missing-{000000..000001}.tar"),
            "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        ssl_vit_main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert "ssl-vit: error: FileNotFoundError" in err and "missing" in err
    monkeypatch.setenv("SSL_VIT_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        ssl_vit_main(args)


def test_a_failed_start_leaves_no_empty_logger_folders(tmp_path):
    logs = tmp_path / "logs"
    args = ["fit", "--config", SMOKE, "--data.train", str(tmp_path / "missing-{000000..000001}.tar"),
            "--trainer.logger", "pytorch_lightning.loggers.CSVLogger", "--trainer.logger.save_dir", str(logs),
            "--trainer.logger.name", "csv"]
    with pytest.raises(FileNotFoundError):
        cli_main(args)
    assert not (logs / "csv").exists()  # neither csv/version_0 nor csv/
    (logs / "csv" / "version_0").mkdir(parents=True)
    (logs / "csv" / "version_0" / "metrics.csv").write_text("kept")  # something in it: nothing is removed
    from ssl_vit.training.checks import remove_if_empty

    remove_if_empty(str(logs / "csv" / "version_0"))
    assert (logs / "csv" / "version_0" / "metrics.csv").read_text() == "kept"


def test_a_run_that_keeps_checkpoints_saves_one_on_ctrl_c(folder, tmp_path):
    """Ctrl-C leaves resumable state where a resume checkpoint is configured: the CLI adds a
    Preemption on SIGINT (the signal path itself: tests/training/test_signals.py); without a
    Checkpoint, or with a Preemption of the recipe's own, nothing is added."""
    import signal

    from ssl_vit.cli import run_lightning
    from ssl_vit.training.preemption import Preemption

    checkpoint = {"class_path": "ssl_vit.training.Checkpoint", "init_args": {"dirpath": str(tmp_path / "ckpt")}}
    base = ["fit", "--config", SMOKE, *_folder_data(folder), "--trainer.max_steps", "1",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", "[]"]

    def preemptions(extra):
        cli = run_lightning(base + extra)
        return [c for c in cli.trainer.callbacks if isinstance(c, Preemption)]

    added = preemptions([f"--trainer.callbacks+={json.dumps(checkpoint)}"])
    assert len(added) == 1 and added[0].signals == [signal.SIGINT] and not added[0].requeue
    assert preemptions([]) == []
    own = {"class_path": "ssl_vit.training.Preemption", "init_args": {"signals": ["SIGUSR1"]}}
    kept = preemptions([f"--trainer.callbacks+={json.dumps(checkpoint)}", f"--trainer.callbacks+={json.dumps(own)}"])
    assert len(kept) == 1 and kept[0].signals == [signal.SIGUSR1]
