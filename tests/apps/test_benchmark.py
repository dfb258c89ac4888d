"""tools/benchmark.py on a tiny CPU configuration: the JSON line has the fields and sane values."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_vit.apps.benchmark import BenchConfig, count_flops_per_image

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
    from ssl_vit.apps.benchmark import build_module

    assert len(build_module(BenchConfig(method="mae", arch="vit_tiny_patch4_32", depth=2, device="cpu")).encoder.vit.blocks) == 2
    with pytest.raises(ValueError, match="--depth"):
        BenchConfig(depth=0, device="cpu")


def test_bad_arguments_are_named():
    result = subprocess.run([sys.executable, "tools/benchmark.py", "--method", "mae", "--batch-size", "0", "--device", "cpu"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0 and "--batch-size must be >= 1" in result.stderr
