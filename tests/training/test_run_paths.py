"""Every path a run reads or writes is set in one obvious place: ``--trainer.default_root_dir`` moves
checkpoints and logs, ``--data.train / --data.eval_train / --data.val`` move all the data (the k-NN
monitor and the attention gallery read the run's DataModule)."""
from pathlib import Path

import pytest
import yaml
from jsonargparse import Namespace

from ssl_vit.cli import fill_root_dir, run_lightning
from ssl_vit.recipes import RECIPES_DIR

SMOKE = str(RECIPES_DIR / "smoke" / "dino.yaml")
ROOT_DIR = "${trainer.default_root_dir}"


def _strings(tree, path=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _strings(value, f"{path}.{key}" if path else key)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _strings(value, f"{path}.{i}")
    elif isinstance(tree, str):
        yield path, tree


@pytest.mark.parametrize("recipe", sorted(RECIPES_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_recipes_write_only_under_the_root_dir(recipe):
    """A checkpoint folder or log folder fixed in a recipe would stay put when --trainer.default_root_dir moves."""
    config = yaml.safe_load(recipe.read_text())
    for path, value in _strings(config):
        if path.endswith((".dirpath", ".save_dir")):
            assert value.startswith(ROOT_DIR), f"{path}: {value}"


@pytest.mark.parametrize("recipe", sorted((RECIPES_DIR / "dino").glob("*.yaml")), ids=lambda p: p.stem)
def test_dino_recipes_take_every_data_path_from_data(recipe):
    config = yaml.safe_load(recipe.read_text())
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c.get("init_args") or {} for c in config["trainer"]["callbacks"]}
    assert "data" not in callbacks["KNNMonitor"]  # no DataModule of its own (its paths were unreachable)
    assert "images" not in callbacks["AttentionGalleryLogger"]  # the gallery shows the run's val images
    data = config["data"]["init_args"]
    assert data["eval_train"] == data["train"] and data["val"]


def test_fill_root_dir_replaces_the_token_everywhere():
    section = Namespace(trainer=Namespace(default_root_dir="/runs/b", callbacks=[
        Namespace(class_path="C", init_args=Namespace(dirpath=f"{ROOT_DIR}/checkpoints", every_n_epochs=3))],
        logger={"init_args": {"save_dir": ROOT_DIR}}), data=Namespace(train="pipe:cat ${HOME}/x.tar"))
    fill_root_dir(section)
    assert section.trainer.callbacks[0].init_args.dirpath == "/runs/b/checkpoints"
    assert section.trainer.callbacks[0].init_args.every_n_epochs == 3
    assert section.trainer.logger["init_args"]["save_dir"] == "/runs/b"
    assert section.data.train == "pipe:cat ${HOME}/x.tar"  # other ${...} (a shell's, in pipe: URLs) untouched


@pytest.fixture(scope="module")
def shards(two_class_shards):
    return two_class_shards


CALLBACKS = """
trainer:
  logger: {class_path: pytorch_lightning.loggers.CSVLogger, init_args: {save_dir: "${trainer.default_root_dir}", name: csv}}
  callbacks:
    - {class_path: ssl_vit.training.Checkpoint, init_args: {dirpath: "${trainer.default_root_dir}/checkpoints", save_last: true}}
    - {class_path: ssl_vit.training.knn_monitor.KNNMonitor, init_args: {k: 2}}
    - {class_path: ssl_vit.viz.AttentionGalleryLogger, init_args: {num_images: 3, image_size: 32}}
"""


@pytest.mark.slow  # trains through the CLI (15 s)
def test_a_run_moves_with_root_dir_and_reads_its_data_from_data(shards, tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(CALLBACKS)
    root = tmp_path / "elsewhere"
    cli = run_lightning(["fit", "--config", SMOKE, "--config", str(overlay), "--trainer.default_root_dir", str(root),
                         "--data.train", shards, "--data.eval_train", shards, "--data.val", shards,
                         "--trainer.max_steps", "2"])
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert list((root / "csv").glob("version_*/metrics.csv"))
    assert 0.0 <= float(cli.trainer.callback_metrics["val/knn_top1"]) <= 1.0  # the monitor ran on --data.*
    assert len(list((root / "csv").glob("version_*/attention/epoch_000/*/image.png"))) == 3  # the run's val images
    saved = yaml.safe_load(next(root.glob("csv/version_*/config.yaml")).read_text())
    assert saved["trainer"]["callbacks"][0]["init_args"]["dirpath"] == str(root / "checkpoints")


def test_the_knn_monitor_names_the_missing_data_option(shards, tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(CALLBACKS)
    with pytest.raises(ValueError, match="KNNMonitor reads its bank and queries from the run's DataModule: give "
                                         "--data.eval_train"):
        run_lightning(["fit", "--config", SMOKE, "--config", str(overlay), "--trainer.default_root_dir", str(tmp_path),
                       "--data.train", shards, "--data.val", shards, "--trainer.max_steps", "1"])
