"""tools/bench_quality.py, reduced to a pipeline check on CPU: 300 + 100 real CIFAR-10 images, tiny
ViTs, one epoch per stage. Every stage runs and writes a valid figure; no quality level is asserted.
Also the pieces that make the GPU run fit its budget: the epoch plan, the warm-up scaling, the
final-metric reader, and a failing stage that names itself."""
import json
import runpy
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ssl_vit.apps.quality import build_parser
from ssl_vit.apps.quality.bench import RECIPES, Bench, QualityOptions, final_metric
from ssl_vit.apps.quality.data import prepare_images, select
from ssl_vit.apps.quality.overrides import StageData, recipe_overrides
from ssl_vit.apps.quality.plan import RunRecord, max_time, plan_epochs, scaled_warmups
from ssl_vit.apps.quality.report import FIGURES
from ssl_vit.apps.runs import StageError
from ssl_vit.checkpoints.load import read_backbone
from ssl_vit.cli import main as cli_main

pytestmark = pytest.mark.slow  # processes, CLI training or end-to-end chains: `make test` only

ROOT = Path(__file__).resolve().parents[2]
ARCHIVE = ROOT / ".." / "shared" / "datasets" / "cifar10-jpg.tar.gz"
ROWS = ["DINO", "MAE", "supervised from scratch", "random weights (DINO protocol)", "random weights (MAE protocol)", "raw pixels"]
NO_FIGURE = {  # the columns a row has no figure for
    "supervised from scratch": {"knn_top1", "linear_top1"},
    "random weights (DINO protocol)": {"finetune_top1"},
    "random weights (MAE protocol)": {"finetune_top1"},
    "raw pixels": {"linear_top1", "finetune_top1"},
}
REDUCED = ["--limit-train", "300", "--limit-test", "100", "--tiny", "--epochs", "1", "--probe-epochs", "1",
           "--finetune-epochs", "1", "--device", "cpu", "--workers", "0", "--batch-size", "50", "--in-process"]


@pytest.mark.skipif(not ARCHIVE.exists(), reason=f"CIFAR-10 archive not found at {ARCHIVE}")
def test_reduced_chain_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    # Transforms run in the training process (--workers 0): one intra-op thread, or torchvision's
    # Gaussian blur spins for ~100 ms per call on a busy 2-core machine.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "quality"
    tool = runpy.run_path(str(ROOT / "tools" / "bench_quality.py"))  # the script's own import path
    start = time.perf_counter()
    # in two commands: the pretrainings, then (--resume) everything else
    part = tool["main"](["--data", str(ARCHIVE), "--output", str(out), *REDUCED, "--stop-after", "mae_pretrain"])
    assert set(part["stages"]) == {"data", "pixels_knn", "dino_pretrain", "mae_pretrain"} and "dino_knn" in part["missing"]
    assert "Incomplete" in (out / "results.md").read_text() and "dino_knn" in (out / "results.md").read_text()
    done_before = {name: (out / name / "result.json").stat().st_mtime_ns for name in part["stages"]}
    returned = tool["main"](["--data", str(ARCHIVE), "--output", str(out), *REDUCED, "--resume"])
    elapsed = time.perf_counter() - start
    assert all((out / name / "result.json").stat().st_mtime_ns == t for name, t in done_before.items())  # skipped

    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(returned)) and results["missing"] == []
    assert results["data"]["counts"] == {"train": 300, "test": 100} and len(results["data"]["classes"]) == 10
    for split, per_class in (("train", 30), ("test", 10)):  # the subset is class-balanced
        folder = Path(results["data"][split])
        assert sorted(len(list(d.iterdir())) for d in folder.iterdir()) == [per_class] * 10
    assert [row["method"] for row in results["rows"]] == ROWS
    for row in results["rows"]:
        for figure in FIGURES:
            value = row[figure]
            if figure in NO_FIGURE.get(row["method"], set()):
                assert value is None, (row["method"], figure)
            else:
                assert isinstance(value, float) and 0.0 <= value <= 1.0, (row["method"], figure, value)
        assert row["epochs"] == (0 if row["method"].startswith(("random", "raw")) else 1)
        assert row["gpu_minutes"] >= 0.0
    assert results["reduced"] and results["failed"] is None and results["command"].startswith("python tools/bench_quality.py")

    # the Markdown table: every row, the same figures as the JSON, and the pipeline-check warning
    md = (out / "results.md").read_text()
    assert "| method | architecture | epochs | GPU-minutes | k-NN top-1 | linear top-1 | finetune top-1 |" in md
    assert "Pipeline check only" in md and results["environment"]["git_commit"] in md
    for row in results["rows"]:
        line = next(text for text in md.splitlines() if text.startswith(f"| {row['method']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")][-3:]
        for cell, figure in zip(cells, FIGURES):
            expected = "—" if row[figure] is None else f"{100 * row[figure]:.2f}%"
            assert cell == expected, (row["method"], figure, cell, expected)

    # each pretraining wrote a final checkpoint of the tiny architecture, one epoch long
    for method in ("dino", "mae"):
        stage = results["stages"][f"{method}_pretrain"]
        loaded = read_backbone(stage["checkpoint"])
        assert (loaded.model.embed_dim, len(loaded.model.blocks)) == (32, 1)
        assert stage["record"]["epochs_completed"] == 1 and not stage["stopped_early"]
        assert (out / f"{method}_pretrain" / "log.txt").is_file()  # ran in a child process
    with Image.open(out / "attention_gallery.png") as sheet:  # 16 rows of 96 px, 5 columns (2 heads)
        assert sheet.size == (5 * 98 + 2, 14 + 16 * 98 + 2)
    print(f"reduced chain: {elapsed:.1f} s")

    # a stage without a result runs again under --resume; a failing child process names its stage,
    # which results.json records
    (out / "mae_pretrain" / "result.json").unlink()
    broken = tmp_path / "broken.yaml"
    broken.write_text((ROOT / "ssl_vit/recipes/mae/vit_small_patch4_cifar10.yaml").read_text() + "not_a_key: 1\n")
    with pytest.raises(StageError, match=r"stage 'mae_pretrain' failed with exit code \d+"):
        tool["main"](["--data", str(ARCHIVE), "--output", str(out), *REDUCED, "--resume", "--recipe", f"mae_pretrain={broken}"])
    failed = json.loads((out / "results.json").read_text())["failed"]
    assert failed["stage"] == "mae_pretrain" and "not_a_key" in failed["error"], failed["error"][-3000:]


def test_plan_fits_whole_epochs_in_the_budget():
    timed = {"epoch_end_s": [14.0, 24.0, 34.0], "wall_s": 50.0}  # 10 s per epoch after a 14 s first one
    plan = plan_epochs(budget_s=600.0, spent_s=50.0, timed=timed, margin=0.1)
    startup, first_extra = 50.0 - 34.0, 14.0 - 10.0
    usable = 600.0 - 50.0 - startup - first_extra
    assert plan["epoch_s"] == 10.0 and plan["startup_s"] == startup
    assert plan["epochs"] == int(usable * 0.9 // 10.0) == 47
    assert plan["max_time_s"] == 600.0 - 50.0 - startup  # the hard stop: the time left after start-up
    assert plan["epochs"] * plan["epoch_s"] + first_extra <= plan["max_time_s"]
    with pytest.raises(ValueError, match="less than one epoch"):
        plan_epochs(budget_s=60.0, spent_s=50.0, timed=timed)
    with pytest.raises(ValueError, match="at least 2 epochs"):
        plan_epochs(budget_s=600.0, spent_s=5.0, timed={"epoch_end_s": [3.0], "wall_s": 5.0})


def test_warmups_scale_with_the_epochs_and_max_time_format():
    dino = {"warmup_epochs": 10, "warmup_teacher_temp_epochs": 30, "freeze_last_layer": 1, "base_lr": 5e-4}
    assert scaled_warmups(dino, 300, 150) == {"warmup_epochs": 5.0, "warmup_teacher_temp_epochs": 15.0}
    assert scaled_warmups({"warmup_epochs": 40}, 1600, 1) == {"warmup_epochs": 0.025}
    assert scaled_warmups({"warmup_epochs": 0}, 100, 10) == {}
    assert max_time(1800) == "00:00:30:00" and max_time(90061.7) == "01:01:01:01" and max_time(0.2) == "00:00:00:01"


def test_final_metric_reads_the_newest_log(tmp_path):
    for version, rows in ((0, "epoch,val/top1\n0,0.9\n"), (1, "epoch,train/loss,val/top1\n0,2.3,\n0,,0.25\n1,2.0,\n1,,0.5\n")):
        (tmp_path / "csv" / f"version_{version}").mkdir(parents=True)
        (tmp_path / "csv" / f"version_{version}" / "metrics.csv").write_text(rows)
    assert final_metric(tmp_path, "val/top1", "probe") == 0.5  # the last epoch of the newest run
    with pytest.raises(StageError, match="stage 'probe'.*no 'val/knn_top1'"):
        final_metric(tmp_path, "val/knn_top1", "probe")
    (tmp_path / "csv" / "version_1" / "metrics.csv").write_text("val/top1\n1.5\n")
    with pytest.raises(StageError, match="not a fraction"):
        final_metric(tmp_path, "val/top1", "probe")
    with pytest.raises(StageError, match="no metrics.csv"):
        final_metric(tmp_path / "elsewhere", "val/top1", "probe")


def _image_tree(root: Path, counts: dict) -> None:
    for split, per_class in counts.items():
        for cls in ("b", "a", "c"):
            for i in range(per_class):
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (i * 20, 0, 0)).save(root / split / cls / f"{i:03d}.png")


def test_subsets_are_balanced_and_bad_input_is_named(tmp_path):
    _image_tree(tmp_path / "src", {"train": 5, "test": 3})
    images = prepare_images(tmp_path / "src", tmp_path / "out", limit_train=7, limit_test=None)
    assert images["counts"] == {"train": 6, "test": 9} and images["classes"] == ["a", "b", "c"]
    assert sorted(p.name for p in (tmp_path / "out" / "train" / "c").iterdir()) == ["000.png", "001.png"]  # first by name
    assert images["test"] == str(tmp_path / "out" / "test")
    assert prepare_images(tmp_path / "src", tmp_path / "x")["train"] == str(tmp_path / "src" / "train")  # used in place
    with pytest.raises(ValueError, match="smaller than the number of classes"):
        select({"train": {"a": ["1"], "b": ["2"]}}, {"train": 1})
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no images under train/<class>/"):
        prepare_images(tmp_path / "flat", tmp_path / "y")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_images(tmp_path / "missing.tar.gz", tmp_path / "z")


def test_bad_options_fail_before_any_work(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="--resume"):
        Bench(QualityOptions(data=tmp_path, output=tmp_path / "busy"))
    with pytest.raises(ValueError, match="unknown stage"):
        Bench(QualityOptions(data=tmp_path, output=tmp_path / "new", recipes={"dino": "x.yaml"}))
    with pytest.raises(FileNotFoundError, match="recipe for mae_pretrain not found"):
        Bench(QualityOptions(data=tmp_path, output=tmp_path / "new", recipes={"mae_pretrain": str(tmp_path / "none.yaml")}))
    with pytest.raises(FileNotFoundError, match="--data .*none does not exist"):
        Bench(QualityOptions(data=tmp_path / "none", output=tmp_path / "new"))
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        Bench(QualityOptions(data=tmp_path, output=tmp_path / "new", epochs=0))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--data", "x", "--recipe", "nonsense"])
    assert not (tmp_path / "new").exists()


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["ssl_vit"] = {"method": "tiny"}


@pytest.mark.parametrize("max_steps, stopped", [(-1, False), (6, True)])
def test_run_record_reports_the_run_and_saves_the_final_weights(tmp_path, max_steps, stopped):
    data = DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=4)  # 4 steps per epoch
    record = RunRecord(str(tmp_path / "record.json"), checkpoint=str(tmp_path / "final.ckpt"))
    trainer = pl.Trainer(max_epochs=3, max_steps=max_steps, callbacks=[record], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    model = _Tiny()
    trainer.fit(model, data)
    got = json.loads((tmp_path / "record.json").read_text())
    assert got["steps_per_epoch"] == 4 and got["max_epochs"] == 3 and got["stopped_early"] is stopped
    assert got["global_step"] == (6 if stopped else 12) and len(got["epoch_end_s"]) == (2 if stopped else 3)  # a cut epoch ends too
    assert got["epoch_end_s"] == sorted(got["epoch_end_s"])
    saved = torch.load(tmp_path / "final.ckpt", weights_only=True)
    assert saved["ssl_vit"] == {"method": "tiny"} and "optimizer_states" not in saved  # weights only
    assert torch.equal(saved["state_dict"]["layer.weight"], model.layer.weight.detach())  # the final weights


def test_the_timed_run_is_a_valid_recipe_run_and_sets_the_plan(tmp_path, monkeypatch):
    """The timed run's settings parse through the CLI (strictly), and its record becomes the plan."""
    _image_tree(tmp_path / "src", {"train": 4, "test": 2})
    bench = Bench(QualityOptions(data=tmp_path / "src", output=tmp_path / "out", device="cpu", workers=0, tiny=True))
    images = prepare_images(tmp_path / "src", tmp_path / "img")
    bench.stages["data"] = {"images": images}
    bench.images, bench.shards = images, {"train": "shards/train-000000.tar", "val": "shards/val-000000.tar"}
    seen = {}

    def fake_run(name, stage_dir, command, key, ov, child, extra=(), timeout=None):
        seen.update(name=name, ov=ov, child=child, timeout=timeout)
        cfg = stage_dir / "overrides.yaml"
        cfg.write_text(yaml.safe_dump(ov))
        with pytest.raises(SystemExit) as exit_info:  # strict parsing of recipe + overrides, nothing run
            cli_main([command, "--config", str(bench.recipes[key]), "--config", str(cfg), "--print_config"])
        assert exit_info.value.code in (0, None)
        Path(ov["trainer"]["callbacks"][0]["init_args"]["path"]).write_text(json.dumps({"epoch_end_s": [30.0, 50.0]}))
        return {"wall_s": 70.0}

    monkeypatch.setattr(bench, "run_stage_cli", fake_run)
    (tmp_path / "out" / "mae_pretrain").mkdir(parents=True)
    plan = bench._plan("mae_pretrain", tmp_path / "out" / "mae_pretrain", 600.0, {"model.init_args.depth": 1})
    trainer = seen["ov"]["trainer"]
    assert seen["child"] and seen["name"] == "mae_pretrain (timed run)" and trainer["max_epochs"] == 2
    assert (trainer["logger"], trainer["enable_checkpointing"], trainer["limit_val_batches"]) == (False, False, 0)
    assert [c["class_path"] for c in trainer["callbacks"]] == ["ssl_vit.apps.quality.plan.RunRecord"]
    assert seen["ov"]["model"]["init_args"]["depth"] == 1 and seen["ov"]["model"]["init_args"]["warmup_epochs"] == 0.05
    # 20 s per epoch, 20 s of start-up, 10 s more for the first epoch: (600 - 70 - 20 - 10) * 0.92 / 20 = 23
    assert plan["epochs"] == 23 and plan["epoch_s"] == 20.0 and plan["max_time_s"] == 510.0
    assert "timed run of 2 epochs" in plan["how"]


def _merged(base, over):
    """A recipe with the overrides applied as jsonargparse does: mappings merged, anything else replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merged(base.get(k), v) for k, v in over.items()}}
    return over


def _strings(tree):
    if isinstance(tree, dict):
        return [s for v in tree.values() for s in _strings(v)]
    if isinstance(tree, list):
        return [s for v in tree for s in _strings(v)]
    return [tree] if isinstance(tree, str) else []


@pytest.mark.parametrize("key", sorted(RECIPES))
def test_overrides_move_every_path_of_the_benchmark_recipes(key, tmp_path):
    data = StageData(folders={"train": "/f/train", "test": "/f/test"}, shards={"train": "/s/train-{0..1}.tar", "val": "/s/val.tar"},
                     seed=3, device="cpu", workers=0, batch_size=8)
    recipe = yaml.safe_load((ROOT / "ssl_vit" / "recipes" / RECIPES[key]).read_text())
    epochs = None if key.endswith("knn") else 30  # k-NN has no epochs
    merged = _merged(recipe, recipe_overrides(recipe, tmp_path / "stage", data, epochs=epochs))
    merged["model"]["init_args"].pop("weights", None)  # each evaluation stage sets it (a checkpoint, or null)
    placeholders = [s for s in _strings(merged) if s.startswith(("runs/", "data/"))]
    assert placeholders == [], f"{key}: still pointing at the recipe's placeholders: {placeholders}"
    trainer = merged["trainer"]
    assert (trainer["accelerator"], trainer["precision"], trainer.get("max_epochs")) == ("cpu", "32-true", epochs)
    assert merged["seed_everything"] == 3
    assert trainer["logger"]["init_args"]["save_dir"] == str(tmp_path / "stage")
    for callback in trainer.get("callbacks", []):
        if "dirpath" in callback["init_args"]:
            assert callback["init_args"]["dirpath"] == str(tmp_path / "stage" / "checkpoints")
    module = merged["data"]["init_args"]
    module = module["data"]["init_args"] if "data" in module else module
    assert module["train"] == "/s/train-{0..1}.tar"
    assert (module["num_workers"], module["batch_size"], module["pin_memory"]) == (0, 8, False)
    assert module.get("val", "/s/val.tar") == "/s/val.tar"
    assert module.get("eval_train", "/s/train-{0..1}.tar") == "/s/train-{0..1}.tar"  # DINO's k-NN bank
    model = recipe["model"]["init_args"]
    for name in ("warmup_epochs", "warmup_teacher_temp_epochs"):  # warm-ups keep their share of the run
        if model.get(name):
            assert merged["model"]["init_args"][name] == pytest.approx(model[name] * 30 / recipe["trainer"]["max_epochs"], abs=1e-3)
