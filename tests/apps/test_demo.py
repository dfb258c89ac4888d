"""`ssl-vit demo`, shortened to one epoch per method: the whole chain runs and writes its outputs."""
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vit.apps.demo import RECIPES, BackgroundPretrain, StageProgress, _shard_pattern, dino_teacher_health, main
from ssl_vit.apps.demo_report import format_table, page_links, tsne_svg
from ssl_vit.apps.runs import few_label_probe
from ssl_vit.methods.dino import DINO

NAMES = ["raw pixels", "MAE pretrained (avg)", "MAE random weights (avg)",
         "DINO pretrained (cls)", "DINO random weights (cls)"]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = main(["--output", str(out), "--mae-epochs", "1", "--dino-epochs", "1", "--probe-draws", "2"])
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert [row["features"] for row in saved["results"]] == NAMES
    for row in saved["results"]:
        assert 0.0 <= row["knn_top1"] <= 1.0
        probe = row["few_label"]
        assert probe["per_class"] == 5 and len(probe["accuracies"]) == 2
        assert all(0.0 <= a <= 1.0 for a in probe["accuracies"]) and 0.0 <= probe["std"] <= 1.0
        assert probe["mean"] == pytest.approx(np.mean(probe["accuracies"]))
        assert row["stage"] in ("pretrain", "evaluate") and row["time_s"] > 0
    assert saved["results"][0]["knn_top1"] > 0.9  # k-NN on raw digits pixels is easy: the data is right
    assert saved["results"][0]["few_label"]["mean"] > 0.5  # 50 labelled digits already go a long way
    assert saved["data"]["train"] + saved["data"]["test"] == 1797
    for key in ("mae_checkpoint", "dino_checkpoint", "mae_reconstructions", "dino_attention", "index"):
        assert Path(saved["paths"][key]).is_file(), key
    assert (out / "mae" / "config.yaml").is_file()  # the resolved recipe of each run
    teacher = saved["dino_teacher"]  # the collapse indicator, against log K of the recipe's 1,024 prototypes
    assert teacher["uniform"] == pytest.approx(math.log(1024), abs=1e-3) and 0 <= teacher["entropy"] <= teacher["uniform"]

    # index.html: every link and picture is relative and resolves to a file of the demo's folder
    page = (out / "index.html").read_text()
    links = page_links(page)
    assert any(link.startswith("mae/reconstructions/") for link in links)
    assert any(link.startswith("dino/attention/") and link.endswith("overlay_mean.png") for link in links)
    for link in links:
        assert not Path(link).is_absolute() and "://" not in link, link
        assert (out / link).resolve().is_file(), link
        assert out.resolve() in (out / link).resolve().parents, link
    assert page.count("<circle") >= saved["data"]["test"]  # the t-SNE: one dot per held-out digit
    assert "5-label probe" in page

    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("features"))
    assert header.split() == ["features", "k-NN", "top-1", "5-label", "probe", "stage", "time"]
    assert "MAE pretrained (avg)" in printed and "Pretraining without labels" in printed
    assert "DINO pretraining:" in printed  # one line per stage
    if saved["side_by_side"]:  # the default on 2 cores or more: MAE ran in a second process, logged apart
        assert "MAE pretraining, beside DINO:" in printed and "side by side" in printed
        log = (out / "mae" / "fit.log").read_text()
        assert "MAE: step" in log and "Traceback" not in log  # its progress lines went to the log
    else:
        assert "MAE pretraining:" in printed
    assert "DINO teacher: output entropy" in printed
    assert "GPU available" not in printed and "LOCAL_RANK" not in printed  # no Lightning banners


@pytest.mark.parametrize("args, message", [
    (["--mae-epochs", "0"], "--mae-epochs must be >= 1"),
    (["--probe-draws", "0"], "--probe-draws must be >= 1"),
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--methods", "byol"], "invalid choice: 'byol'"),
])
def test_demo_rejects_bad_arguments(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["--output", str(tmp_path / "demo"), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args, sequential", [([], False), (["--sequential"], True)])
def test_sequential_reaches_the_demo(tmp_path, monkeypatch, args, sequential):
    import ssl_vit.apps.demo as demo

    seen = {}

    def fake_run_demo(*positional, **options):
        seen.update(options)
        raise SystemExit(0)

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path / "demo"), *args])
    assert seen["sequential"] is sequential


def test_a_failing_background_pretraining_names_its_error_and_log(tmp_path):
    job = BackgroundPretrain(RECIPES / "mae_digits.yaml", str(tmp_path / "missing-{000000..000001}.tar"),
                             tmp_path / "mae", epochs=1, seed=0, threads=1)
    with pytest.raises(RuntimeError, match=r"demo mae_digits \(run in the background\) failed: .*missing") as err:
        job.join()
    assert str(tmp_path / "mae" / "fit.log") in str(err.value)
    assert "Traceback" in (tmp_path / "mae" / "fit.log").read_text()  # the whole story is kept
    job.stop()  # a finished job: a no-op


def test_demo_rejects_an_output_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path / "file")])
    assert "is not a folder" in capsys.readouterr().err


def _summary(pixels_probe: float) -> dict:
    row = lambda name, knn, probe: {"features": name, "knn_top1": knn, "stage": "evaluate", "time_s": 2.0,
                                    "few_label": {"mean": probe, "std": 0.01, "per_class": 5}}
    return {"results": [row("raw pixels", 0.97, pixels_probe), row("MAE pretrained (avg)", 0.93, 0.80),
                        row("MAE random weights (avg)", 0.50, 0.40)],
            "methods": ["mae"], "few_label": {"per_class": 5}, "notes": ["x"], "timings": {"total_s": 3.0}}


def test_table_and_verdict_say_which_way_the_numbers_went():
    table = format_table(_summary(pixels_probe=0.85))
    assert "93.0%" in table and "80.0% ± 1.0" in table and "evaluate 2 s" in table and "note: x" in table
    assert "raw pixels still win by 5.0 points" in table and "MAE 50.0% -> 93.0%" in table
    assert "beat raw pixels by 10.0 points" in format_table(_summary(pixels_probe=0.70))
    assert "match raw pixels" in format_table(_summary(pixels_probe=0.80))  # a tie is not "win by 0.0"


def test_few_label_probe_uses_per_class_labels_and_draws():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 5
    labels = torch.arange(3).repeat_interleave(20)
    feats = centres[labels] + torch.randn(60, 8, generator=g)
    result = few_label_probe(feats, labels, feats, labels, per_class=2, draws=3, seed=1)
    assert len(result["accuracies"]) == 3 and result["mean"] > 0.9  # well-separated classes
    assert few_label_probe(feats, labels, feats, labels, per_class=2, draws=3, seed=1) == result  # seeded
    with pytest.raises(ValueError, match="fewer than 25"):
        few_label_probe(feats, labels, feats, labels, per_class=25)


def test_few_label_probe_is_not_led_by_high_variance_dimensions():
    # self-supervised features share a large offset and have high-variance dimensions that say
    # nothing about the class; standardising with the training images' statistics (no labels) lets
    # a probe on 20 examples find the small class signal, L2 normalisation alone leaves it near chance
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(30)
    signal = torch.nn.functional.one_hot(labels, 4).float() * 0.1 + torch.randn(120, 4, generator=g) * 0.02
    nuisance = torch.randn(120, 4, generator=g) * 3.0
    feats = torch.cat([signal, nuisance], dim=1) + 10.0
    assert few_label_probe(feats, labels, feats, labels, per_class=5, draws=3)["mean"] > 0.9


def test_tsne_svg_has_a_dot_per_point_and_a_legend():
    svg = tsne_svg(np.array([[0.0, 0.0], [1.0, 2.0], [3.0, 1.0]]), [0, 1, 9])
    assert svg.startswith("<svg") and svg.count("<circle") == 3 + 10 and ">9</text>" in svg


def test_stage_progress_prints_plain_lines_when_not_a_terminal():
    class Trainer:
        estimated_stepping_batches, global_step = 8, 0
        callback_metrics = {"train/loss": torch.tensor(1.5)}

    stream, trainer, module = io.StringIO(), Trainer(), torch.nn.Linear(1, 1)
    progress = StageProgress(stream)
    progress.on_train_start(trainer, module)
    for step in range(1, 9):
        trainer.global_step = step
        progress.on_train_batch_end(trainer, module, None, None, step - 1)
    progress.on_train_end(trainer, module)
    lines = stream.getvalue().splitlines()
    assert lines == [f"  Linear: step {s}/8, loss 1.500" for s in (2, 4, 6)] and "\r" not in stream.getvalue()


def test_shard_pattern():
    info = {"shards": ["train-000000.tar", "train-000001.tar", "train-000002.tar"]}
    assert _shard_pattern(info, Path("/s")) == "/s/train-{000000..000002}.tar"
    assert _shard_pattern({"shards": ["train-000000.tar"]}, Path("/s")) == "/s/train-000000.tar"


def test_multicrop_flip_can_be_turned_off_for_digits():
    from torchvision.transforms import v2

    from ssl_vit.data.multicrop import MultiCropTransform

    flips = lambda t: [s.p for view in t.views for s in view.transforms if isinstance(s, v2.RandomHorizontalFlip)]
    assert flips(MultiCropTransform(32, 16, 2)) == [0.5] * 4  # the reference's default is kept
    assert flips(MultiCropTransform(32, 16, 2, hflip=0.0)) == [0.0] * 4
    with pytest.raises(ValueError, match="hflip"):
        MultiCropTransform(32, 16, 2, hflip=1.5)


def test_dino_teacher_health_reads_the_collapse_from_the_final_temperature_and_centre(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            pixels = np.random.default_rng(i + 3 * (label == "b")).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
    torch.manual_seed(0)
    model = DINO(arch="vit_tiny_patch8_32", img_size=32, embed_dim=32, depth=1, num_heads=2, out_dim=64,
                 head_hidden_dim=32, head_bottleneck_dim=16, drop_path_rate=0.0)
    model.teacher_temp = 1e4  # a very soft teacher: uniform outputs, entropy log K
    flat = dino_teacher_health(model, tmp_path)
    assert flat["uniform"] == pytest.approx(math.log(64), abs=1e-3)
    assert flat["entropy"] == pytest.approx(flat["uniform"], abs=1e-3) and flat["kl_to_centre"] < 1e-3
    model.teacher_temp = 1e-4  # a very sharp one: each image on one prototype
    sharp = dino_teacher_health(model, tmp_path)
    assert sharp["entropy"] < 0.05  # (at initialisation every image picks the same prototype: KL 0)
