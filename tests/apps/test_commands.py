"""`ssl-vit`: every subcommand listed, reachable, with its --help; what is not offered says so."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_vit.apps.commands import COMMANDS, LIGHTNING, main, resolve, run
from ssl_vit.cli import main as cli_main
from ssl_vit.recipes import RECIPES_DIR, find_recipe, packaged_recipes

ROOT = Path(__file__).resolve().parents[2]
APPS = ["demo", "make-shards", "index-shards", "export", "attention", "reconstruct", "benchmark", "quality", "analyze", "study", "describe"]


def _available(name: str) -> bool:
    module = COMMANDS[name].target.partition(":")[0]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return False
        raise
    return True


def test_help_lists_every_command_with_a_summary():
    """A child process: ``ssl-vit --help`` imports no command module, so it is quick and always works."""
    done = subprocess.run([sys.executable, "-m", "ssl_vit", "--help"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("  ")}
    assert list(lines) == ["fit", "validate", "predict", *APPS]
    for name, line in lines.items():
        assert len(line.split()) > 3, line  # a one-line summary after the name
    assert "test" not in lines


@pytest.mark.parametrize("name", APPS)
def test_every_app_command_has_its_help(name, capsys):
    if not _available(name):
        pytest.skip(f"{COMMANDS[name].target} is not in this branch")
    with pytest.raises(SystemExit) as exit_info:
        run([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ssl-vit {name}"), out[:200]


def test_no_command_is_an_error_with_the_list(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2 and "make-shards" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["test", "--config", "smoke/mae"], "`ssl-vit test` is not offered: no stage has a test split"),
    (["tset"], "unknown command 'tset'; the commands are fit, validate, predict, demo"),
])
def test_what_is_not_offered_says_so(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("SSL_VIT_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and message in err and "Traceback" not in err


def test_lightning_refuses_test_and_the_optimizer_options(capsys):
    """The methods own their optimisers (LightningCLI's auto_configure_optimizers off) and define no
    test step: neither is offered by the parser."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["test", "--help"])
    assert exit_info.value.code != 0 and "invalid choice: 'test'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--optimizer" not in out and "--lr_scheduler" not in out and "--model" in out
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", "smoke/mae", "--optimizer", "torch.optim.SGD", "--print_config"])
    assert exit_info.value.code != 0 and "--optimizer" in capsys.readouterr().err


def test_a_missing_command_module_is_named(monkeypatch):
    monkeypatch.setitem(COMMANDS, "index-shards", COMMANDS["index-shards"]._replace(target="ssl_vit.data.nope:main"))
    with pytest.raises(ValueError, match="`ssl-vit index-shards` is not available in this installation: its module "
                                         "ssl_vit.data.nope is missing"):
        resolve("index-shards")
    monkeypatch.setitem(COMMANDS, "index-shards", COMMANDS["index-shards"]._replace(target="ssl_vit.data:nope"))
    with pytest.raises(ValueError, match="ssl_vit.data has no nope()"):
        resolve("index-shards")


def test_every_command_target_resolves():
    for name, command in COMMANDS.items():
        if _available(name):
            assert callable(resolve(name)), name
    assert COMMANDS["fit"].target == LIGHTNING


def test_a_command_exit_status_is_the_process_status(tmp_path, capsys):
    args = ["make-shards", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out"), "--split", "train",
            "--shard-size", "4"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err


# -- recipes by name -------------------------------------------------------------------------------

def test_recipes_are_found_by_name(tmp_path, monkeypatch):
    target = RECIPES_DIR / "mae" / "vit_base_patch16_in1k.yaml"
    for value in ("mae/vit_base_patch16_in1k", "mae/vit_base_patch16_in1k.yaml", "recipes/mae/vit_base_patch16_in1k.yaml"):
        assert find_recipe(value) == target, value
    monkeypatch.chdir(tmp_path)  # a file that exists wins over the packaged recipe
    (tmp_path / "mae").mkdir()
    (tmp_path / "mae" / "vit_base_patch16_in1k.yaml").write_text("seed_everything: 1\n")
    assert find_recipe("mae/vit_base_patch16_in1k.yaml") == Path("mae/vit_base_patch16_in1k.yaml")
    assert "smoke/mae" in packaged_recipes() and "demo/dino_digits" in packaged_recipes()


def test_an_unknown_recipe_names_close_ones():
    with pytest.raises(FileNotFoundError, match="no such file, and no packaged recipe of that name; did you mean "
                                                "mae/vit_base_patch16_in1k"):
        find_recipe("mae/vit_base_patch16")
    with pytest.raises(FileNotFoundError, match="packaged recipes: .*smoke/mae"):
        find_recipe("zzz")


def test_fit_takes_a_recipe_by_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", "smoke/mae", "--config={trainer: {max_steps: 3}}", "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: ssl_vit.methods.mae.MAE" in out and "max_steps: 3" in out
