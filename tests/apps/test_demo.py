"""`ssl-vit demo`, shortened to one epoch per method: the whole chain runs and writes its outputs."""
import json
from pathlib import Path

import pytest

from ssl_vit.apps.demo import _shard_pattern, format_table, main


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = main(["--output", str(out), "--mae-epochs", "1", "--dino-epochs", "1"])
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    names = [row["features"] for row in saved["results"]]
    assert names == ["raw pixels", "MAE pretrained (avg)", "MAE random weights (avg)",
                     "DINO pretrained (cls)", "DINO random weights (cls)"]
    for row in saved["results"]:
        assert 0.0 <= row["knn_top1"] <= 1.0
    assert saved["results"][0]["knn_top1"] > 0.9  # k-NN on raw digits pixels is easy: the data is right
    assert saved["data"]["train"] + saved["data"]["test"] == 1797
    for key in ("mae_checkpoint", "dino_checkpoint", "mae_reconstructions", "dino_attention"):
        assert (out / saved["paths"][key].split(str(out) + "/")[-1]).is_file(), key
    assert (out / "mae" / "config.yaml").is_file()  # the resolved recipe of each run
    printed = capsys.readouterr().out
    assert "k-NN top-1" in printed and "MAE pretrained (avg)" in printed


def test_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path), "--mae-epochs", "0"])


def test_shard_pattern_and_table():
    info = {"shards": ["train-000000.tar", "train-000001.tar", "train-000002.tar"]}
    assert _shard_pattern(info, Path("/s")) == "/s/train-{000000..000002}.tar"
    assert _shard_pattern({"shards": ["train-000000.tar"]}, Path("/s")) == "/s/train-000000.tar"
    table = format_table({"results": [{"features": "raw pixels", "knn_top1": 0.5}], "notes": ["x"],
                          "timings": {"total_s": 3.0}})
    assert "50.0%" in table and "note: x" in table
