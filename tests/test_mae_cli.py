"""End to end: the smoke recipe through the CLI, the reconstruction callback, the visualisation tool."""
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ssl_vit.checkpoints.mae import load_mae
from ssl_vit.cli import main as cli_main
from ssl_vit.data import write_shards
from ssl_vit.methods.mae import MAE
from ssl_vit.models.backbone import VIT_SIZES

pytestmark = pytest.mark.slow  # trains through the CLI: `make test` only

ROOT = Path(__file__).resolve().parents[1]


def _image_folder(root: Path, n: int = 8, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mae_data")
    write_shards(_image_folder(tmp / "images"), tmp / "shards", "train", shard_size=4, progress=False)
    return str(tmp / "shards" / "train-{000000..000001}.tar")


def test_smoke_recipe_runs_and_logs_reconstructions(shards, tmp_path):
    cli_main([
        "fit", "--config", str(ROOT / "ssl_vit/recipes/smoke/mae.yaml"), "--trainer.fast_dev_run", "true",
        "--data.train", shards, "--trainer.default_root_dir", str(tmp_path),
    ])
    png = tmp_path / "reconstructions" / "epoch_000.png"
    assert png.is_file()
    with Image.open(png) as image:
        # 4 panels x 4 images of 32 px, 2 px padding, enlarged 3x under a 14-px header of column names
        assert image.size == (3 * (4 * 34 + 2), 3 * (4 * 34 + 2) + 14)


def test_cli_checkpoint_loads_and_visualize_tool_writes_pngs(shards, tmp_path):
    cli_main([
        "fit", "--config", str(ROOT / "ssl_vit/recipes/smoke/mae.yaml"), "--data.train", shards,
        "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "2", "--trainer.max_epochs", "1",
        "--trainer.enable_checkpointing", "true", "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"), "--trainer.callbacks.filename", "last",
    ])
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    module = load_mae(checkpoint)
    assert module.norm_pix_loss and module.encoder.vit.embed_dim == 32
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())
    images = _image_folder(tmp_path / "photos", n=3)
    out = tmp_path / "vis"
    tool = runpy.run_path(str(ROOT / "tools/visualize_mae.py"))  # the script itself, run in-process
    tool["main"](["--weights", str(checkpoint), "--images", str(images / "class0"), str(images / "class1" / "1.png"),
                  "--output", str(out), "--seed", "3"])
    with Image.open(out / "reconstructions_000.png") as image:
        assert image.size == (3 * (4 * 34 + 2), 3 * (3 * 34 + 2) + 14)  # three images (two from the folder, one file)
    with pytest.raises(FileNotFoundError, match="image path not found"):
        tool["main"](["--weights", str(checkpoint), "--images", str(tmp_path / "missing.png"), "--output", str(out)])


@pytest.mark.parametrize("recipe", sorted((ROOT / "ssl_vit" / "recipes" / "mae").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_parse_strictly_and_follow_the_paper(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:  # LightningCLI validates every key, then exits
        cli_main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "ssl_vit.methods.mae.MAE" in capsys.readouterr().out
    config = yaml.safe_load(recipe.read_text())
    model, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
    assert model["mask_ratio"] == 0.75 and model["norm_pix_loss"] is True and model["base_lr"] == 1.5e-4
    assert model["betas"] == [0.9, 0.95] and model["weight_decay"] == 0.05 and model["warmup_epochs"] == 40
    assert trainer["precision"] == "bf16-mixed"
    transform = data["train_transform"]
    assert transform["class_path"] == "ssl_vit.data.PretrainTransform" and transform["init_args"]["scale"] == [0.2, 1.0]
    if recipe.stem.endswith("in1k"):
        effective = trainer["devices"] * trainer.get("num_nodes", 1) * data["batch_size"] * trainer["accumulate_grad_batches"]
        assert effective == 4096 and trainer["max_epochs"] == 800
        assert (model["decoder_embed_dim"], model["decoder_depth"], model["decoder_num_heads"]) == (512, 8, 16)
    # the architecture builds (one encoder block, to stay small) with the name's width and patch
    mae = MAE(**{**model, "depth": 1})
    size, patch = model["arch"].split("_")[1], int(model["arch"].split("_")[2].removeprefix("patch"))
    assert mae.encoder.vit.embed_dim == VIT_SIZES[size][0] and mae.patch_size == patch
    assert mae.encoder.vit.patch_embed.img_size[0] == transform["init_args"]["size"]
