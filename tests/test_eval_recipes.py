"""The probe, k-NN and finetune recipes: strict parsing, the papers' numbers, and each 32x32 recipe
run end to end through `ssl_vit.cli.main` (fast_dev_run, CPU) on tiny shards of a tiny ImageFolder."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ssl_vit.checkpoints.format import backbone_metadata
from ssl_vit.checkpoints.load import load_backbone
from ssl_vit.cli import main as cli_main
from ssl_vit.data import write_shards
from ssl_vit.models.backbone import create_backbone

pytestmark = pytest.mark.slow  # processes, CLI training or end-to-end chains: `make test` only

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [p for d in ("probe", "finetune") for p in sorted((ROOT / "ssl_vit" / "recipes" / d).glob("*.yaml"))]
TINY = dict(embed_dim=32, depth=4, num_heads=2)  # 4 blocks: the DINO recipes read the last 4


def effective_batch(config: dict) -> int:
    trainer, data = config["trainer"], config["data"]["init_args"]
    data = data["data"]["init_args"] if "data" in data else data
    return trainer["devices"] * trainer.get("num_nodes", 1) * data["batch_size"] * trainer.get("accumulate_grad_batches", 1)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_parse_strictly(recipe, capsys):
    command = "validate" if recipe.stem.startswith("knn") else "fit"
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "ssl_vit.methods." in capsys.readouterr().out


def test_recipes_follow_the_papers():
    load = lambda name: yaml.safe_load((ROOT / "ssl_vit" / "recipes" / name).read_text())  # noqa: E731
    mae = load("probe/mae_linear_vit_base_patch16_in1k.yaml")
    m = mae["model"]["init_args"]
    assert (m["protocol"], m["feature"], m["base_lr"], m["warmup_epochs"], m["weight_decay"]) == ("mae", "cls", 0.1, 10, 0.0)
    assert effective_batch(mae) == 16384 and mae["trainer"]["max_epochs"] == 90
    dino = load("probe/dino_linear_vit_small_patch16_in1k.yaml")
    m = dino["model"]["init_args"]
    assert (m["protocol"], m["n_last_blocks"], m["base_lr"], m["weight_decay"]) == ("dino", 4, 0.001, 0.0)
    assert effective_batch(dino) == 1024 and dino["trainer"]["max_epochs"] == 100
    for name in ("probe/knn_vit_small_patch16_in1k.yaml", "probe/knn_vit_small_patch4_cifar10.yaml"):
        knn = load(name)
        assert (knn["model"]["init_args"]["k"], knn["model"]["init_args"]["temperature"]) == (20, 0.07)
        assert knn["data"]["init_args"]["train_transform"]["class_path"] == "ssl_vit.data.EvalTransform"
    ft = load("finetune/vit_base_patch16_in1k.yaml")
    m = ft["model"]["init_args"]
    assert (m["base_lr"], m["layer_decay"], m["drop_path_rate"], m["warmup_epochs"], m["weight_decay"]) == (5e-4, 0.65, 0.1, 5, 0.05)
    assert (m["mixup"], m["cutmix"], m["label_smoothing"], m["global_pool"], m["betas"]) == (0.8, 1.0, 0.1, "avg", [0.9, 0.999])
    assert effective_batch(ft) == 1024 and ft["trainer"]["max_epochs"] == 100
    t = ft["data"]["init_args"]["train_transform"]["init_args"]
    assert (t["auto_augment"], t["re_prob"], t["interpolation"]) == ("rand-m9-mstd0.5-inc1", 0.25, "bicubic")
    cached = load("probe/dino_linear_vit_small_patch4_cifar10_cached.yaml")["data"]["init_args"]["data"]["init_args"]
    assert cached["train_transform"]["class_path"] == "ssl_vit.data.EvalTransform"  # cached features: no augmentation


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Shards of a 2-class 32x32 ImageFolder and an ssl_vit (DINO-layout) checkpoint of a tiny ViT."""
    tmp = tmp_path_factory.mktemp("eval_recipes")
    rng = np.random.default_rng(0)
    for i in range(12):
        folder = tmp / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    write_shards(tmp / "images", tmp / "shards", "train", shard_size=6, progress=False)
    write_shards(tmp / "images", tmp / "shards", "val", shard_size=12, progress=False)
    torch.manual_seed(0)
    teacher, student = create_backbone("vit_small_patch4_32", **TINY), create_backbone("vit_small_patch4_32", **TINY)
    state = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    state.update({f"student.backbone.{k}": v for k, v in student.state_dict().items()})
    meta = backbone_metadata("dino", "vit_small_patch4_32", TINY, {"teacher": "teacher.backbone.", "student": "student.backbone."}, "teacher")
    torch.save({"state_dict": state, "ssl_vit": meta}, tmp / "dino.ckpt")
    return tmp


@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.stem.endswith(("cifar10", "cifar10_cached"))], ids=lambda p: p.stem)
def test_cifar10_recipes_run_through_the_cli(recipe, tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = "--data.data" if recipe.stem.endswith("_cached") else "--data"
    shards = tiny_run / "shards"
    command = "validate" if recipe.stem.startswith("knn") else "fit"
    cli_main([
        command, "--config", str(recipe), "--model.weights", str(tiny_run / "dino.ckpt"),
        f"{data}.train", str(shards / "train-{000000..000001}.tar"), f"{data}.val", str(shards / "val-000000.tar"),
        f"{data}.batch_size", "4", f"{data}.num_workers", "0", f"{data}.pin_memory", "false",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
        "--trainer.logger", "false", "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path),
    ])
    if command == "fit":  # the run's last.ckpt carries the backbone metadata: load_backbone reads it
        (last,) = tmp_path.rglob("last.ckpt")
        backbone = load_backbone(last)
        teacher = load_backbone(tiny_run / "dino.ckpt")
        same = [torch.equal(v, teacher.state_dict()[k]) for k, v in backbone.state_dict().items() if k in teacher.state_dict()]
        if recipe.parent.name == "probe":
            assert all(same) and backbone.state_dict().keys() == teacher.state_dict().keys()  # frozen
        else:
            renamed = {k.replace("norm.", "fc_norm.", 1) if k.startswith("norm.") else k for k in teacher.state_dict()}
            assert backbone.global_pool == "avg" and set(backbone.state_dict()) == renamed  # average pooling + fc_norm
