"""Real JPEGs: part of CIFAR-10 through the shard writer and back through ShardDataModule."""
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vit.data import EvalTransform, ShardDataModule, write_shards

ARCHIVE = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "cifar10-jpg.tar.gz"
CLASSES = ("bird", "dog", "frog")  # the first classes stored in the archive's test/ part
PER_CLASS = 70


def extract_some(dest: Path) -> dict:
    """Stream the archive and extract PER_CLASS test images of each of CLASSES (not the whole tar)."""
    taken: Counter = Counter()
    with tarfile.open(ARCHIVE, "r|gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not (member.isfile() and len(parts) == 4 and parts[1] == "test" and parts[2] in CLASSES):
                continue
            if taken[parts[2]] < PER_CLASS:
                target = dest / parts[2] / parts[3]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                taken[parts[2]] += 1
            if sum(taken.values()) == PER_CLASS * len(CLASSES):
                break
    return dict(taken)


@pytest.mark.skipif(not ARCHIVE.exists(), reason=f"CIFAR-10 archive not found at {ARCHIVE}")
def test_cifar_subset_round_trip(tmp_path):
    assert extract_some(tmp_path / "src") == {c: PER_CLASS for c in CLASSES}
    info = write_shards(tmp_path / "src", tmp_path / "shards", "test", 64, progress=False)
    n = PER_CLASS * len(CLASSES)
    assert info["num_samples"] == n and info["skipped"] == [] and info["classes"] == sorted(CLASSES)
    assert info["shard_samples"] == [64, 64, 64, n - 192]

    transform = EvalTransform(size=32, crop_pct=1.0)
    module = ShardDataModule(str(tmp_path / "shards" / "test-{000000..000003}.tar"),
                             val=str(tmp_path / "shards" / "test-{000000..000003}.tar"),
                             batch_size=50, num_workers=2, val_transform=transform)
    got_sum = {c: torch.zeros(3, 32, 32, dtype=torch.float64) for c in range(3)}
    labels = Counter()
    for images, ys in module.val_dataloader():
        assert images.shape[1:] == (3, 32, 32)
        for image, y in zip(images, ys.tolist()):
            got_sum[y] += image.double()
            labels[y] += 1
    assert labels == {0: PER_CLASS, 1: PER_CLASS, 2: PER_CLASS}
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    for label, name in enumerate(sorted(CLASSES)):  # per-class pixel sums, decoded independently
        pixels = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255
                  for p in sorted((tmp_path / "src" / name).iterdir())]
        expected = sum((p - mean) / std for p in pixels)
        np.testing.assert_allclose(got_sum[label].numpy(), expected, atol=1e-3)
    batches = list(module.train_dataloader())  # 210 samples, 2 readers: 2 x 150 padded
    assert len(batches) == len(module.train_dataloader()) == 6 and all(b[0].shape[0] == 50 for b in batches)
