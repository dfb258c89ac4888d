"""End to end: the DINO smoke recipe through the CLI on real shards, the checkpoint through
``ssl_vit.load_backbone``, and every DINO recipe parsed strictly and checked against the paper."""
from pathlib import Path

import pytest
import torch
import yaml

from ssl_vit.checkpoints.load import load_backbone
from ssl_vit.cli import main as cli_main
from ssl_vit.cli import run_lightning
from ssl_vit.data.gpu_augment import MultiCropGPUAugment
from ssl_vit.data.multicrop import NormaliseViews
from ssl_vit.methods.dino import DINO
from ssl_vit.models.backbone import VIT_SIZES

pytestmark = pytest.mark.slow  # trains through the CLI: `make test` only

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "ssl_vit" / "recipes" / "smoke" / "dino.yaml")


@pytest.fixture(scope="module")
def shards(two_class_shards):
    return two_class_shards


def test_smoke_recipe_runs_with_fast_dev_run(shards, tmp_path):
    cli_main(["fit", "--config", SMOKE, "--trainer.fast_dev_run", "true", "--data.train", shards,
              "--trainer.default_root_dir", str(tmp_path)])


def test_smoke_recipe_with_device_side_augmentation(shards, tmp_path, monkeypatch):
    """With MultiCropCrops the loader yields uint8 crops and DINO augments them batched on the device
    (``on_after_batch_transfer``): the training step sees normalised float views of both sizes."""
    seen, step = [], DINO.training_step

    def recording_step(self, batch, batch_idx):
        seen.append([(v.dtype, tuple(v.shape[-2:]), float(v.mean())) for v in batch[0]])
        return step(self, batch, batch_idx)

    monkeypatch.setattr(DINO, "training_step", recording_step)
    cli = run_lightning([
        "fit", "--config", SMOKE, "--data.train", shards, "--trainer.default_root_dir", str(tmp_path),
        "--trainer.max_steps", "2",
        "--data.train_transform.class_path", "ssl_vit.data.gpu_augment.MultiCropCrops",
    ])
    assert isinstance(cli.model.augment, MultiCropGPUAugment)
    assert len(seen) == 2
    for views in seen:
        assert [dtype for dtype, _, _ in views] == [torch.float32] * 4
        assert [size for _, size, _ in views] == [(32, 32)] * 2 + [(16, 16)] * 2
        assert all(abs(mean) < 3 for _, _, mean in views)  # normalised, not 0..255


def test_smoke_recipe_with_uint8_views_normalised_on_the_device(shards, tmp_path, monkeypatch):
    """``MultiCropTransform(uint8_views=True)`` from the command line: the loader yields uint8 views and
    DINO normalises them where the batch lands; the step sees the normalised float views."""
    seen, step = [], DINO.training_step

    def recording_step(self, batch, batch_idx):
        seen.append([(v.dtype, tuple(v.shape[-2:]), float(v.mean())) for v in batch[0]])
        return step(self, batch, batch_idx)

    monkeypatch.setattr(DINO, "training_step", recording_step)
    switches = [f"--data.train_transform.init_args.{name}=true"
                for name in ("torch_resize", "fused_views", "uint8_views")]
    cli = run_lightning([
        "fit", "--config", SMOKE, "--data.train", shards, "--trainer.default_root_dir", str(tmp_path),
        "--trainer.max_steps", "2", *switches,
    ])
    assert isinstance(cli.model.augment, NormaliseViews) and cli.datamodule.train_transform.uint8_views
    assert len(seen) == 2
    for views in seen:
        assert [dtype for dtype, _, _ in views] == [torch.float32] * 4
        assert [size for _, size, _ in views] == [(32, 32)] * 2 + [(16, 16)] * 2
        assert all(abs(mean) < 3 for _, _, mean in views)  # normalised, not 0..255


def test_cli_checkpoint_loads_as_the_teacher_backbone(shards, tmp_path):
    cli_main([
        "fit", "--config", SMOKE, "--data.train", shards, "--trainer.default_root_dir", str(tmp_path),
        "--trainer.max_steps", "2", "--trainer.enable_checkpointing", "true",
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"),
        "--trainer.callbacks.filename", "last",
    ])
    path = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(path, weights_only=True)["state_dict"]
    x = torch.randn(2, 3, 32, 32)
    for role in ("teacher", "student"):
        backbone = load_backbone(path, role=role)
        prefix = f"{role}.backbone."
        assert backbone.state_dict().keys() == {k[len(prefix):] for k in state if k.startswith(prefix)}
        assert all(torch.equal(v, state[prefix + k]) for k, v in backbone.state_dict().items())
    assert not torch.equal(load_backbone(path)(x), load_backbone(path, role="student")(x))  # EMA lags
    torch.testing.assert_close(load_backbone(path)(x), load_backbone(path, role="teacher")(x))  # default


@pytest.mark.parametrize("recipe", sorted((ROOT / "ssl_vit" / "recipes" / "dino").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_parse_strictly_and_follow_the_paper(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:  # LightningCLI validates every key, then exits
        cli_main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "ssl_vit.methods.dino.DINO" in capsys.readouterr().out
    config = yaml.safe_load(recipe.read_text())
    model, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
    # the README's ViT-B command keeps main_dino.py's defaults; the others are its ViT-S "full command"
    vit_b = recipe.stem == "vit_base_patch16_in1k"
    temps = (0.04, 0.04, 0) if vit_b else (0.04, 0.07, 30)
    assert (model["warmup_teacher_temp"], model["teacher_temp"], model["warmup_teacher_temp_epochs"]) == temps
    assert model["student_temp"] == 0.1 and model["momentum_teacher"] == 0.996 and model["center_momentum"] == 0.9
    assert (model["base_lr"], model["min_lr"], model["warmup_epochs"]) == (5e-4, 1e-6, 10)
    assert (model["weight_decay"], model["weight_decay_end"], model["clip_grad"], model["freeze_last_layer"]) == (0.04, 0.4, 3.0, 1)
    assert trainer["precision"] == "bf16-mixed" and "gradient_clip_val" not in trainer
    crops = data["train_transform"]
    assert crops["class_path"] == "ssl_vit.data.multicrop.MultiCropTransform"
    crops = crops["init_args"]
    assert crops["global_scale"] == [0.4, 1.0] and crops["local_scale"] == [0.05, 0.4]
    callbacks = [c["class_path"] for c in trainer.get("callbacks", [])]
    assert "ssl_vit.training.knn_monitor.KNNMonitor" in callbacks
    if recipe.stem.endswith("in1k"):
        batch = trainer["devices"] * trainer.get("num_nodes", 1) * data["batch_size"] * trainer.get("accumulate_grad_batches", 1)
        assert batch == 1024 and trainer["max_epochs"] == (100 if vit_b else 300)
        assert (crops["global_size"], crops["local_size"], crops["num_local"]) == (224, 96, 8)  # main_dino.py's
        assert model["out_dim"] == 65536 and model["img_size"] == 224
    else:
        assert (crops["global_size"], crops["local_size"]) == (32, 16) and model["img_size"] == 32
    # the architecture builds (one block, a small head, to stay small) with the name's width and patch
    dino = DINO(**{**model, "depth": 1, "out_dim": 64})
    size, patch = model["arch"].split("_")[1], int(model["arch"].split("_")[2].removeprefix("patch"))
    vit = dino.teacher.backbone
    assert vit.embed_dim == VIT_SIZES[size][0] and vit.patch_embed.patch_size == (patch, patch)
    assert vit.patch_embed.img_size[0] == crops["global_size"]
    assert dino.student.head.last_layer.parametrizations.weight.original0.requires_grad == (not model["norm_last_layer"])
