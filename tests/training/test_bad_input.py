"""Bad input and configuration fail at start-up, before any compute, with a message naming the problem.

"Before any compute" is checked with a sentinel: every method's ``configure_model`` (which Lightning
calls right after the ``setup`` hooks, before it moves the model, builds the optimiser or touches a
dataloader) records that it was reached; a run refused at start-up never gets there. Most runs go
through ``ssl_vit.cli.main`` in-process (the same code path as ``python -m ssl_vit``, without the
interpreter start); two go through the real command line. Unknown keys of the model and trainer
sections are tested in tests/test_cli.py.
"""
import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import List

import numpy as np
import pytest
import pytorch_lightning as pl
import yaml
from PIL import Image

from ssl_vit.checkpoints.mae import load_mae
from ssl_vit.cli import main as cli_main
from ssl_vit.data import write_shards
from ssl_vit.methods.dino import DINO
from ssl_vit.methods.finetune import Finetune
from ssl_vit.methods.knn import KNNEval
from ssl_vit.methods.mae import MAE
from ssl_vit.methods.probe import LinearProbe
from ssl_vit.training.checks import check_patch_multiples, check_resume_config, model_config_differences

ROOT = Path(__file__).resolve().parents[2]
SMOKE_MAE, SMOKE_DINO = str(ROOT / "ssl_vit/recipes/smoke/mae.yaml"), str(ROOT / "ssl_vit/recipes/smoke/dino.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """8 RGB 32x32 images of 2 classes in 2 shards of 4, and an MAE smoke checkpoint (one step)."""
    tmp = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng(0)
    for i in range(8):
        (tmp / "images" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp / "images" / f"c{i % 2}" / f"{i}.png")
    write_shards(tmp / "images", tmp / "shards", "train", shard_size=4, progress=False)
    shards = str(tmp / "shards" / "train-{000000..000001}.tar")
    reached: List[str] = []
    with pytest.MonkeyPatch.context() as patch:  # the sentinel of `started` sees a good run start
        patch.setattr(MAE, "configure_model", lambda self: reached.append("MAE"), raising=False)
        cli_main([
            "fit", "--config", SMOKE_MAE, "--data.train", shards, "--trainer.default_root_dir", str(tmp / "run"),
            "--trainer.max_steps", "1", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "true",
            "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", str(tmp / "ckpt"),
            "--trainer.callbacks.filename", "mae",
        ])
    assert reached == ["MAE"]
    return {"tmp": tmp, "shards": shards, "dir": tmp / "shards", "mae_ckpt": str(tmp / "ckpt" / "mae.ckpt")}


@pytest.fixture
def started(monkeypatch) -> List[str]:
    """Names of the methods whose run got past the start-up checks (``configure_model`` reached)."""
    reached: List[str] = []
    for cls in (MAE, DINO, LinearProbe, Finetune):
        monkeypatch.setattr(cls, "configure_model", lambda self: reached.append(type(self).__name__), raising=False)
    return reached


def base_args(recipe: str, data: dict, tmp_path: Path) -> List[str]:
    return ["fit", "--config", recipe, "--data.train", data["shards"], "--trainer.default_root_dir", str(tmp_path),
            "--trainer.max_steps", "1", "--trainer.callbacks", "[]"]


def refused(args: List[str], started: List[str], capsys) -> str:
    """Run the CLI in-process, expect it to fail before any compute; return its error text."""
    with pytest.raises((Exception, SystemExit)) as info:
        cli_main(args)
    assert not started, f"the run got past start-up ({started}) before failing with: {info.value}"
    if isinstance(info.value, SystemExit):
        assert info.value.code != 0
        return capsys.readouterr().err
    return f"{type(info.value).__name__}: {info.value}"


def probe_recipe(tmp_path: Path, data: dict, **model_args) -> str:
    """The MAE smoke recipe turned into a linear probe of the smoke checkpoint (with validation)."""
    recipe = yaml.safe_load(Path(SMOKE_MAE).read_text())
    recipe["model"] = {"class_path": "ssl_vit.methods.probe.LinearProbe",
                       "init_args": {"weights": data["mae_ckpt"], "lr": 0.01, "warmup_epochs": 0, **model_args}}
    recipe["data"]["init_args"].update(val=data["shards"], val_transform={
        "class_path": "ssl_vit.data.EvalTransform", "init_args": {"size": 32, "crop_pct": 1.0}})
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def run_cli(args: List[str], **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", **env_vars}
    return subprocess.run([sys.executable, "-m", "ssl_vit", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


# -- shards ---------------------------------------------------------------------------------------
def test_shard_pattern_in_a_missing_directory(data, tmp_path, started, capsys):
    missing = str(tmp_path / "nowhere" / "train-{000000..000001}.tar")
    error = refused(base_args(SMOKE_MAE, data, tmp_path) + ["--data.train", missing], started, capsys)
    assert str(tmp_path / "nowhere" / "train") in error


def test_shard_pattern_naming_shards_the_json_does_not_list(data, tmp_path, started, capsys):
    pattern = str(data["dir"] / "train-{000000..000003}.tar")  # the JSON lists 2 shards
    error = refused(base_args(SMOKE_MAE, data, tmp_path) + ["--data.train", pattern], started, capsys)
    assert "train-000002.tar" in error and "not listed" in error


def test_shard_files_missing_beside_their_json(data, tmp_path, started, capsys):
    copy = tmp_path / "shards"
    shutil.copytree(data["dir"], copy)
    (copy / "train-000001.tar").unlink()
    error = refused(base_args(SMOKE_MAE, data, tmp_path) + ["--data.train", str(copy / "train-{000000..000001}.tar")],
                    started, capsys)
    assert "train-000001.tar" in error


def _empty_split(root: Path, claimed: int) -> str:
    """One shard with no tar member; its JSON claims ``claimed`` samples."""
    root.mkdir()
    with tarfile.open(root / "empty-000000.tar", "w"):
        pass
    info = {"num_samples": claimed, "shards": ["empty-000000.tar"], "shard_samples": [claimed], "classes": []}
    (root / "empty.json").write_text(json.dumps(info))
    return str(root / "empty-000000.tar")


def test_empty_split_whose_json_says_zero(data, tmp_path, started, capsys):
    error = refused(base_args(SMOKE_MAE, data, tmp_path) + ["--data.train", _empty_split(tmp_path / "e", 0)], started, capsys)
    assert "empty-000000.tar" in error and "no samples" in error


def test_empty_tar_whose_json_claims_samples(data, tmp_path, started, capsys):
    error = refused(base_args(SMOKE_MAE, data, tmp_path) + ["--data.train", _empty_split(tmp_path / "e", 4)], started, capsys)
    assert "empty-000000.tar" in error and "empty" in error


# -- sizes against the patch size -------------------------------------------------------------------
def test_real_cli_refuses_dino_local_crops_that_are_not_patch_multiples(data, tmp_path):
    result = run_cli(base_args(SMOKE_DINO, data, tmp_path) + ["--data.train_transform.local_size", "18"])
    assert result.returncode != 0
    assert "data.train_transform (MultiCropTransform) view 2 makes 18x18 images" in result.stderr
    assert "4x4 patches (use e.g. 16 or 20)" in result.stderr
    assert "Traceback" not in result.stderr  # one message, not a traceback (ssl_vit.apps.commands)
    traced = run_cli(base_args(SMOKE_DINO, data, tmp_path) + ["--data.train_transform.local_size", "18"],
                     SSL_VIT_TRACEBACK="1")
    assert "in setup" in traced.stderr and "training_step" not in traced.stderr  # refused before any step


@pytest.mark.parametrize(
    "recipe, override, expected",
    [
        (SMOKE_MAE, ["--data.train_transform.size", "30"], "data.train_transform (PretrainTransform) makes 30x30"),
        (SMOKE_DINO, ["--data.train_transform.global_size", "30"], "data.train_transform (MultiCropTransform) view 0 makes 30x30"),
        ("probe", ["--data.val_transform.size", "30"], "data.val_transform (EvalTransform) makes 30x30"),
    ],
    ids=["mae-pretrain", "dino-global", "probe-eval"],
)
def test_image_sizes_not_multiples_of_the_patch_size(recipe, override, expected, data, tmp_path, started, capsys):
    recipe = probe_recipe(tmp_path, data) if recipe == "probe" else recipe
    error = refused(base_args(recipe, data, tmp_path) + override, started, capsys)
    assert expected in error and "4x4 patches" in error


def test_patch_check_on_non_square_sizes_and_silent_transforms():
    class Sized:
        def __init__(self, *sizes):
            self.sizes = list(sizes)

        def output_sizes(self):
            return self.sizes

    check_patch_multiples({"a": Sized((32, 48)), "b": lambda image: image, "c": None}, [(16, 16)])  # all fine
    with pytest.raises(ValueError, match=r"a \(Sized\) view 1 makes 32x40 images, not a multiple of the model's 16x16"):
        check_patch_multiples({"a": Sized((32, 48), (32, 40))}, [(16, 16)])
    with pytest.raises(ValueError, match=r"makes 32x32 images, not a multiple of the model's 8x12 patches"):
        check_patch_multiples({"a": Sized((32, 32))}, [(8, 12)])


# -- recipe values ----------------------------------------------------------------------------------
def test_unknown_key_of_a_nested_transform_is_named(data, tmp_path, started, capsys):
    error = refused(base_args(SMOKE_MAE, data, tmp_path) + ["--data.train_transform.sise", "32"], started, capsys)
    assert "sise" in error


@pytest.mark.parametrize("ratio", ["0", "1"])  # the bounds; MAE's check is one comparison
def test_mask_ratio_outside_zero_one(ratio, data, tmp_path, started, capsys):
    error = refused(base_args(SMOKE_MAE, data, tmp_path) + ["--model.mask_ratio", ratio], started, capsys)
    assert f"mask_ratio must be in (0, 1), got {float(ratio)}" in error


@pytest.mark.parametrize("option, value, expected", [
    ("lr", ".inf", "MAE: lr must be a finite number, got inf"),
    ("weight_decay", ".nan", "MAE: weight_decay must be a finite number, got nan"),
    ("weight_decay_end", ".nan", "MAE: weight_decay_end must be a finite number, got nan"),
    ("mask_ratio", "0.99", "mask_ratio=0.99 leaves no patch visible"),
])
def test_non_finite_or_impossible_settings_are_refused_naming_the_option(option, value, expected, data, tmp_path,
                                                                        started, capsys):
    error = refused(base_args(SMOKE_MAE, data, tmp_path) + [f"--model.{option}", value], started, capsys)
    assert expected in error


def test_probe_class_count_disagreeing_with_the_shards_json(data, tmp_path, started, capsys):
    error = refused(base_args(probe_recipe(tmp_path, data, num_classes=10), data, tmp_path), started, capsys)
    assert "num_classes=10 is given, but the datamodule has 2 classes" in error


# -- checkpoints of another architecture ------------------------------------------------------------
def test_probe_recipe_on_a_checkpoint_of_another_architecture(data, tmp_path, started, capsys):
    error = refused(base_args(probe_recipe(tmp_path, data, arch="vit_small_patch16"), data, tmp_path), started, capsys)
    assert "is a vit_tiny_patch4_32 backbone" in error and "arch='vit_small_patch16'" in error
    wider = probe_recipe(tmp_path, data, backbone_kwargs={"embed_dim": 64})
    error = refused(base_args(wider, data, tmp_path), started, capsys)
    assert "tensor shapes do not match" in error and "cls_token" in error


def test_python_loaders_refuse_a_checkpoint_of_another_architecture(data, tmp_path):
    ckpt = data["mae_ckpt"]
    with pytest.raises(ValueError, match="is a vit_tiny_patch4_32 backbone.*arch='vit_base_patch16'"):
        Finetune(weights=ckpt, arch="vit_base_patch16")
    with pytest.raises(ValueError, match="is a vit_tiny_patch4_32 backbone.*arch='vit_small_patch8'"):
        KNNEval(weights=ckpt, arch="vit_small_patch8")
    with pytest.raises(ValueError, match=r"(?s)tensor shapes do not match.*encoder\.vit\.cls_token"):
        load_mae(ckpt, embed_dim=64)
    tool = runpy.run_path(str(ROOT / "tools" / "export_backbone.py"))  # the script itself, in-process
    with pytest.raises(ValueError, match="is a vit_tiny_patch4_32 backbone.*arch='vit_small_patch16'"):
        tool["main"](["--weights", ckpt, "--arch", "vit_small_patch16", "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_trainer_fit_resuming_a_checkpoint_of_another_architecture_stops_before_compute(data, tmp_path, started):
    from ssl_vit.data import PretrainTransform, ShardDataModule

    wider = MAE(arch="vit_tiny_patch4_32", embed_dim=64, depth=1, num_heads=2, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2, warmup_epochs=0)
    dm = ShardDataModule(data["shards"], batch_size=4, num_workers=0, pin_memory=False, train_transform=PretrainTransform(32))
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"size mismatch for encoder\.vit\.cls_token"):
        trainer.fit(wider, datamodule=dm, ckpt_path=data["mae_ckpt"])
    assert trainer.global_step == 0


def test_cli_resume_from_a_checkpoint_of_another_method(data, tmp_path, started, capsys):
    error = refused(base_args(SMOKE_DINO, data, tmp_path) + ["--ckpt_path", data["mae_ckpt"]], started, capsys)
    assert "the recipe trains ssl_vit.methods.dino.DINO, the checkpoint holds ssl_vit.methods.mae.MAE" in error


def test_cli_resume_from_a_checkpoint_of_another_architecture(data, tmp_path, started, capsys):
    args = base_args(SMOKE_MAE, data, tmp_path) + ["--model.embed_dim", "64", "--ckpt_path", data["mae_ckpt"]]
    error = refused(args, started, capsys)
    assert "embed_dim: recipe 64, checkpoint 32" in error


def test_resume_config_differences_are_named():
    recipe = {"class_path": "m.MAE", "init_args": {"embed_dim": 64, "depth": 1, "betas": [0.9, 0.95]}}
    same = {"class_path": "m.MAE", "init_args": {"embed_dim": 64, "depth": 1, "betas": (0.9, 0.95)}}
    check_resume_config(recipe, same, "x.ckpt")
    wider = {"class_path": "m.MAE", "init_args": {"embed_dim": 32, "depth": 1, "betas": [0.9, 0.95], "extra": 1}}
    assert model_config_differences(recipe, wider) == ["embed_dim: recipe 64, checkpoint 32", "extra: recipe None, checkpoint 1"]
    with pytest.raises(ValueError, match="method: the recipe trains m.MAE, the checkpoint holds m.DINO"):
        check_resume_config(recipe, {"class_path": "m.DINO", "init_args": {}}, "x.ckpt")
