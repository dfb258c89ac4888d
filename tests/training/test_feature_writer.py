"""`ssl-vit predict`: features, labels and sample keys of every image to disk, in chunks, with a
manifest; each rank its own part (2 CPU processes)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_helpers import ROOT, clean_env, write_indexed_shards
from ssl_vit.checkpoints.format import CHECKPOINT_KEY, backbone_metadata
from ssl_vit.cli import run_lightning
from ssl_vit.data import EvalTransform
from ssl_vit.eval.features import vit_features
from ssl_vit.models.backbone import create_backbone
from ssl_vit.training.feature_writer import read_features

NUM_SAMPLES, SHARD_SIZE, CHUNK = 13, 5, 4
TINY = dict(embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """13 images (label = index) as shards, and a tiny ssl_vit checkpoint of a DINO-like stage."""
    root = tmp_path_factory.mktemp("predict")
    shards = write_indexed_shards(root, NUM_SAMPLES, SHARD_SIZE)
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch4_32", **TINY).eval()
    meta = backbone_metadata("dino", "vit_tiny_patch4_32", TINY, {"teacher": "teacher.backbone."}, "teacher")
    torch.save({"state_dict": {f"teacher.backbone.{k}": v for k, v in vit.state_dict().items()}, CHECKPOINT_KEY: meta},
               root / "dino.ckpt")
    return root, shards.pattern, vit


def predict_args(root: Path, pattern: str, out: Path, fmt: str = "safetensors", *extra: str) -> list:
    writer = {"class_path": "ssl_vit.training.feature_writer.FeatureWriter",
              "init_args": {"output_dir": str(out), "format": fmt, "chunk_rows": CHUNK}}
    return ["predict", "--config", "predict/features", "--ckpt_path", str(root / "dino.ckpt"),
            "--data.train", pattern, "--data.val", pattern, "--data.batch_size", "3", "--data.num_workers", "0",
            "--data.pin_memory", "false", "--data.val_transform.init_args.size", "32",
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(root / "run"),
            "--trainer.callbacks", json.dumps([writer]), "--trainer.enable_progress_bar", "false", *extra]


def expected(root: Path, vit) -> dict:
    """label -> {feature: vector}, computed directly from each image file."""
    transform, out = EvalTransform(size=32), {}
    for i in range(NUM_SAMPLES):
        image = transform(Image.open(root / "images" / f"s{i:03d}" / "0.png").convert("RGB"))[None]
        with torch.no_grad():
            out[i] = {name: vit_features(vit, image, name)[0].numpy() for name in ("cls", "avg")}
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_predict_writes_every_feature_label_and_key(data, tmp_path, fmt):
    root, pattern, vit = data
    out = tmp_path / "features"
    run_lightning(predict_args(root, pattern, out, fmt))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == fmt and manifest["features"] == {"cls": 32, "avg": 32}
    assert manifest["model"]["weights"] == str(root / "dino.ckpt")  # --ckpt_path became the extractor's weights
    want = expected(root, vit)
    for split in ("train", "val"):
        parts = manifest["splits"][split]["parts"]
        assert [p["rows"] for p in parts] == [4, 4, 4, 1] and {p["rank"] for p in parts} == {0}
        assert all((out / f).is_file() for p in parts for f in p["files"])
        got = read_features(str(out), split)
        assert sorted(got["labels"].tolist()) == list(range(NUM_SAMPLES))
        assert len(set(got["keys"].tolist())) == NUM_SAMPLES
        for row, label in enumerate(got["labels"].tolist()):
            for name in ("cls", "avg"):
                np.testing.assert_allclose(got[name][row], want[label][name], rtol=1e-4, atol=1e-5)


def test_predict_refuses_to_overwrite_and_double_weights(data, tmp_path):
    root, pattern, _ = data
    out = tmp_path / "features"
    run_lightning(predict_args(root, pattern, out))
    with pytest.raises(FileExistsError, match="manifest.json exists: an earlier extraction"):
        run_lightning(predict_args(root, pattern, out))
    with pytest.raises(ValueError, match="both name the weights; give one"):
        run_lightning(predict_args(root, pattern, tmp_path / "f2", "safetensors", "--model.weights", "other.ckpt"))


@pytest.mark.slow  # two processes
def test_each_rank_writes_its_own_part(data, tmp_path):
    root, pattern, vit = data
    out = tmp_path / "features"
    command = [sys.executable, "-m", "ssl_vit", *predict_args(root, pattern, out), "--trainer.devices", "2",
               "--trainer.strategy", "ddp"]
    done = subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    parts = manifest["splits"]["train"]["parts"]
    assert {p["rank"] for p in parts} == {0, 1} and all((out / f).is_file() for p in parts for f in p["files"])
    got = read_features(str(out), "train")
    assert set(got["labels"].tolist()) == set(range(NUM_SAMPLES))  # padding may repeat a sample across ranks
    want = expected(root, vit)
    for row, label in enumerate(got["labels"].tolist()):
        np.testing.assert_allclose(got["cls"][row], want[label]["cls"], rtol=1e-4, atol=1e-5)
