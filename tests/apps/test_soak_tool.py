"""tools/soak_data.py: a 2-epoch run gives sane figures (the real soak is run by hand, see docs)."""
import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # processes, CLI training or end-to-end chains: `make test` only

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool() -> dict:
    return runpy.run_path(str(ROOT / "tools" / "soak_data.py"))  # the script itself, in-process


def test_two_epochs_report_memory_of_main_process_and_workers(tool, capsys):
    args = ["--epochs", "2", "--samples", "24", "--image-size", "16", "--shard-size", "8", "--workers", "2",
            "--batch-size", "4", "--size", "16", "--samples-per-epoch", "2"]
    assert tool["main"](args) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["epochs"] == 2 and result["workers"] == 2 and result["transform"] == "multicrop"
    assert result["batches_per_epoch"] == 6 and result["samples_per_epoch"] == 24  # 2 workers x 3 batches of 4
    for series in ("total_rss_mib", "total_pss_mib", "main_rss_after_epoch_mib"):
        figures = result[series]
        assert 10 < figures["first"] <= figures["max"] and figures["last"] <= figures["max"]
        assert figures["growth"] == pytest.approx(figures["last"] - figures["first"], abs=0.11)
    # the workers' memory is counted: more than the main process alone
    assert result["total_rss_mib"]["first"] > result["main_rss_after_epoch_mib"]["first"]
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("epoch ")] == ["epoch 0", "epoch 1"]


def test_memory_of_this_process_and_its_children(tool):
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)"])
    try:
        for _ in range(200):  # until the child has touched its 64 MiB
            now = tool["memory"](os.getpid())
            if now["workers_rss"] > 64:
                break
            time.sleep(0.05)
        assert now["workers"] >= 1 and now["workers_rss"] > 64
        assert now["total_rss"] == pytest.approx(now["main_rss"] + now["workers_rss"])
    finally:
        child.kill()
        child.wait()


def test_bad_arguments_are_refused(tool, capsys):
    with pytest.raises(SystemExit):
        tool["main"](["--epochs", "0"])
    assert "--epochs must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool["main"](["--jpeg-decoder", "torchvision"])  # without --torch-resize: refused before any data is made
    assert "jpeg_decoder='torchvision' needs torch_resize=True" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool["main"](["--fused-views"])  # without --torch-resize
    assert "fused_views=True needs torch_resize=True" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool["main"](["--fused-views", "--torch-resize", "--transform", "pretrain"])
    assert "--fused-views is a switch of the multicrop transform, not of pretrain" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool["main"](["--uint8-views", "--torch-resize"])  # without --fused-views
    assert "uint8_views=True needs fused_views=True" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool["main"](["--uint8-views", "--transform", "crops"])
    assert "--uint8-views is a switch of the multicrop transform, not of crops" in capsys.readouterr().err
