"""tools/benchmark.py on a tiny CPU configuration: the JSON line has the fields and sane values."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_vit.apps.benchmark import BenchConfig, build_module, count_flops_per_image, vit_forward_gflop
from ssl_vit.apps.benchmark import main as benchmark_main
from ssl_vit.apps.benchmark_data import PIPELINES
from ssl_vit.apps import benchmark_suite as suite
from ssl_vit.apps.benchmark_suite import GPU_ROWS, PENDING, TABLE_END, TABLE_START

pytestmark = pytest.mark.slow  # processes, CLI training or end-to-end chains: `make test` only

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--arch", "vit_tiny_patch4_32", "--depth", "2", "--batch-size", "4", "--steps", "2", "--warmup", "1",
        "--precision", "32", "--device", "cpu"]


@pytest.mark.parametrize("method,extra", [
    ("mae", ["--img-size", "32"]),
    ("dino", ["--global-size", "32", "--local-size", "16", "--local-crops", "2", "--out-dim", "64"]),
])
def test_benchmark_tool_prints_one_json_line(method, extra):
    result = subprocess.run([sys.executable, "tools/benchmark.py", "--method", method, *TINY, *extra],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["settings"]["method"] == method and row["settings"]["batch_size"] == 4
    assert row["img_per_s"] > 0 and row["step_ms"] > 0
    assert abs(row["img_per_s"] * row["step_ms"] / 1000 - 4) < 0.05  # batch / step time
    assert row["gflop_per_img"] > 0 and row["peak_tflops"] > 0
    assert 0 < row["mfu"] < 1
    assert row["peak_mem_gib"] is None  # CPU: no device memory counter


def test_flops_scale_with_the_model():
    """The counted FLOPs follow the architecture: ViT-S (2x the width of ViT-Ti) costs about 4x."""
    base = dict(method="dino", batch_size=2, device="cpu", precision="32", global_size=32, local_size=16,
                local_crops=2, out_dim=64, depth=2)
    small = count_flops_per_image(BenchConfig(arch="vit_tiny_patch4_32", **base))
    large = count_flops_per_image(BenchConfig(arch="vit_small_patch4_32", **base))
    assert large > 2 * small > 0


def test_depth_overrides_the_arch_and_is_checked():
    assert len(build_module(BenchConfig(method="mae", arch="vit_tiny_patch4_32", depth=2, device="cpu")).encoder.vit.blocks) == 2
    with pytest.raises(ValueError, match="--depth"):
        BenchConfig(depth=0, device="cpu")


def test_bad_arguments_are_named():
    result = subprocess.run([sys.executable, "tools/benchmark.py", "--method", "mae", "--batch-size", "0", "--device", "cpu"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0 and "--batch-size must be >= 1" in result.stderr


def test_precision_defaults_to_fp32_on_cpu():
    """bf16 autocast on a CPU without bf16 matrix units is emulated (one tiny MAE step took 111 s)."""
    assert BenchConfig(device="cpu").precision == "32-true"
    assert BenchConfig(device="cpu", precision="bf16-mixed").precision == "bf16-mixed"


def test_vit_forward_flops_are_counted_as_the_vit_paper_counts_them():
    """2 FLOPs per multiply-add: ViT-B/16 at 224 is 17.6 G multiply-adds, so about 35 GFLOPs."""
    gflop = vit_forward_gflop(BenchConfig(method="mae", arch="vit_base_patch16", device="cpu"))
    assert 34.5 < gflop < 36.0, gflop


def test_gpu_suite_dry_run_writes_jsonl_and_regenerates_the_table(tmp_path):
    """The suite on tiny CPU models within 30 s: every row is in the JSONL as run or skipped (with
    the reason), the timed steps respect the budget, and the table regenerated from the JSONL puts
    the measured rows, the skipped ones and the pending ones in docs/benchmarks.md's table."""
    out = tmp_path / "suite.jsonl"
    result = subprocess.run([sys.executable, "tools/benchmark.py", "--suite", "gpu", "--tiny", "--budget-minutes", "0.5",
                             "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    header, rows = lines[0], {line["row"]: line for line in lines[1:]}
    assert header["suite"] == "gpu" and header["budget_s"] == 30 and header["tiny"] is True
    assert list(rows) == [r.id for r in GPU_ROWS]  # every row, in order
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert ok and ok[0]["row"] == "mae-b16-bf16" and ok[0]["settings"]["precision"] == "32-true"
    assert all(r["status"] in ("ok", "skipped") for r in rows.values()), [r.get("reason") for r in rows.values()]
    assert all(r["reason"].startswith("does not fit") for r in rows.values() if r["status"] == "skipped")
    for r in ok:
        assert r["img_per_s"] > 0 and r["gflop_per_img"] > 0 and r["vit_forward_gflop"] > 0
    ran = sum(r["wall_s"] for r in ok)
    assert ran < 30 + max(r["wall_s"] for r in ok)  # a row starts only while its estimate fits
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"before\n{TABLE_START}\nold table\n{TABLE_END}\nafter\n")
    regen = subprocess.run([sys.executable, "tools/benchmark.py", "--regenerate-table", str(out), "--doc", str(doc)],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert regen.returncode == 0, regen.stderr[-2000:]
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old table" not in text
    assert "2 FLOPs per multiply-add" in text or "GFLOPs" in text
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert len(table_rows) == len(GPU_ROWS)
    assert sum("measured on cpu" in line for line in table_rows) == len(ok)
    assert sum("skipped: does not fit" in line for line in table_rows) == len(rows) - len(ok)
    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join(json.dumps(line) for line in lines[:2]) + "\n")
    subprocess.run([sys.executable, "tools/benchmark.py", "--regenerate-table", str(partial), "--doc", str(doc)],
                   check=True, capture_output=True, cwd=ROOT, timeout=120)
    assert doc.read_text().count(PENDING) == len(GPU_ROWS) - 1


@pytest.mark.parametrize("argv, message", [
    (["--suite", "gpu", "--tiny", "--rows", "nope"], "--rows: unknown nope"),
    (["--regenerate-table", "missing.jsonl"], "no such file missing.jsonl"),
    (["--data-only", "--pipelines", "dino-cpu,bogus"], "--pipelines: unknown bogus"),
    (["--data-only", "--workers", "x"], "--workers takes"),
    (["--method", "dino", "--device", "cpu", "--fast-data"], "--fast-data switches the transforms that read real shards"),
])
def test_suite_and_data_benchmark_name_bad_arguments(argv, message, capsys):
    # in-process (tools/benchmark.py calls this main; the tests above run the script itself)
    with pytest.raises(SystemExit) as exc:
        benchmark_main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_data_benchmark_measures_every_pipeline_against_its_reference(tmp_path):
    """A short run of ``--data-only`` (all pipelines, 1 worker, 1 round): one row per pipeline with a
    positive rate, and the ratios to the reference of the same family."""
    out = tmp_path / "data.jsonl"
    result = subprocess.run([sys.executable, "tools/benchmark.py", "--data-only", "--images", "40", "--rounds", "1",
                             "--seconds", "0.2", "--workers", "1", "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    *rows, summary = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["pipeline"] for r in rows] == list(PIPELINES) and all(r["img_per_s"] > 0 for r in rows)
    ratios = {s["pipeline"]: s["x_reference"] for s in summary["summary"]}
    assert ratios["dino-reference"] is None and ratios["decode"] is None and ratios["dino-crops"] > 0
    assert summary["machine"]["nproc"] >= 1 and summary["images"]["images"] == 40
    assert "| `dino-crops-fast` |" in result.stdout


def test_quality_chain_gets_the_time_left_and_reports_it(tmp_path, monkeypatch):
    """The chain runs `ssl-vit quality` with a quarter of what is left per pretraining, keeps its
    results.md for the table, and is skipped (with the reason) when too little is left."""
    calls = []

    def fake_quality(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--output") + 1])
        out.mkdir(parents=True)
        (out / "results.md").write_text("| method | k-NN |\n|---|---|\n| supervised | 50% |\n")
        return 0

    monkeypatch.setattr(suite, "quality_command", fake_quality)
    plan = suite.Plan(budget_s=600, quality_s=240, start=suite.time.perf_counter() - 360)  # 240 s left
    line = suite.run_quality_chain(tmp_path / "data.tar.gz", tmp_path / "q", plan, tiny=False)
    assert line["status"] == "ok" and "supervised" in line["results_md"]
    minutes = float(calls[0][calls[0].index("--budget-minutes") + 1])
    assert abs(minutes - 1.0) < 0.02  # 240 s left / 4
    assert "supervised | 50%" in suite.table([{"row": "quality", **line}])
    late = suite.Plan(budget_s=600, quality_s=240, start=suite.time.perf_counter() - 560)
    skipped = suite.run_quality_chain(tmp_path / "data.tar.gz", tmp_path / "q2", late, tiny=False)
    assert skipped["status"] == "skipped" and len(calls) == 1


def test_fast_data_turns_on_each_transforms_speed_switches():
    from ssl_vit.apps.benchmark_train import BenchConfig, shard_datamodule
    from ssl_vit.data.gpu_augment import MultiCropCrops
    from ssl_vit.data.multicrop import MultiCropTransform

    def transform(**kw):
        return shard_datamodule(BenchConfig(device="cpu", data="x-{000000..000001}.tar", **kw)).train_transform

    cpu, crops, mae = (transform(method="dino", fast_data=True), transform(method="dino", fast_data=True, gpu_augment=True),
                       transform(method="mae", fast_data=True))
    assert type(cpu) is MultiCropTransform and cpu.fused_views and cpu.uint8_views and isinstance(crops, MultiCropCrops)
    assert all(t.torch_resize and t.draft and t.jpeg_decoder == "torchvision" for t in (cpu, crops, mae))
    default = transform(method="dino")
    assert not (default.fused_views or default.uint8_views or default.torch_resize or default.draft)
    assert default.jpeg_decoder == "pil"
