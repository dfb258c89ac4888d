"""Streaming shards: exact per-rank epochs, epochs under a Trainer, info JSON lookup, untrusted
shards (corrupt images, pickle members), the corrupt-sample limit."""
import io
import json
import logging
import pathlib
import pickle
import shutil
import tarfile
from collections import Counter

import pytest
import pytorch_lightning as pl
import torch

from ssl_vit.data import EvalTransform, ShardDataModule, write_shards
from ssl_vit.data.decode import CorruptCounter, CorruptDataError, ShardReadError
from ssl_vit.data.shard_info import default_info_path, load_shard_info

TO_TENSOR = EvalTransform(size=8, crop_pct=1.0)


class TwoViews:
    """A list-returning transform (as DINO's multi-crop): two views of different sizes."""

    def __call__(self, image):
        return [EvalTransform(8, crop_pct=1.0)(image), EvalTransform(4, resize=4)(image)]


class _Touch:
    """Unpickling this creates ``path`` (what a hostile ``.pyd`` member would do)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


@pytest.fixture
def id_shards(tmp_path, make_folder):
    """50 images, each its own class (label == sample id), in 7 shards of 8 (the last holds 2)."""
    make_folder(tmp_path / "src", [1] * 50)
    info = write_shards(tmp_path / "src", tmp_path / "shards", "train", 8, progress=False)
    assert info["shard_samples"] == [8] * 6 + [2]
    return tmp_path / "shards" / "train-{000000..000006}.tar"


def labels_of(loader) -> list:
    """Per-batch label lists of one pass (checks every batch is full)."""
    batches = []
    for images, labels in loader:
        assert images.shape == (loader.batch_size, 3, 8, 8) and labels.dtype == torch.int64
        batches.append(labels.tolist())
    return batches


def dm(pattern, **kwargs) -> ShardDataModule:
    kwargs = {"batch_size": 4, "num_workers": 0, "train_transform": TO_TENSOR, "val_transform": TO_TENSOR, **kwargs}
    return ShardDataModule(str(pattern), **kwargs)


@pytest.mark.parametrize("epoch", [0, 3])
def test_two_ranks_two_workers_read_every_sample(id_shards, epoch):
    per_rank = []
    for rank in range(2):
        module = dm(id_shards, num_workers=2, rank=rank, world_size=2, seed=7)
        module.set_epoch(epoch)
        loader = module.train_dataloader()
        # 4 readers, each ceil(50 / (4 * 4)) * 4 = 16 samples: 8 batches per rank
        assert len(loader) == 8
        per_rank.append(labels_of(loader))
    assert [len(b) for b in per_rank] == [8, 8]
    counts = Counter(label for batches in per_rank for batch in batches for label in batch)
    assert set(counts) == set(range(50))  # every sample at least once ...
    assert sum(counts.values()) == 64 and max(counts.values()) == 2  # ... and only the 14 padding twice


def test_epoch_changes_order_and_single_rank_covers_all(id_shards):
    module = dm(id_shards, shuffle_buffer=0)
    orders = []
    for epoch in (0, 1, 0):
        module.set_epoch(epoch)
        orders.append([x for b in labels_of(module.train_dataloader()) for x in b])
    assert orders[0] == orders[2] and orders[0] != orders[1]
    for order in orders:  # ceil(50 / 4) * 4 = 52 samples, all 50 present
        assert len(order) == 52 and set(order) == set(range(50))


def test_resampled_gives_equal_batches_per_rank(id_shards):
    lengths = []
    for rank in range(3):
        loader = dm(id_shards, resampled=True, rank=rank, world_size=3).train_dataloader()
        lengths.append((len(loader), len(labels_of(loader))))
    assert lengths == [(5, 5)] * 3  # ceil(50 / (3 * 4)) = 5 batches on every rank


def test_validation_reads_every_sample_once(id_shards):
    loader = dm(id_shards, val=str(id_shards), num_workers=2, batch_size=8).val_dataloader()
    labels = [x for _, y in loader for x in y.tolist()]
    assert len(loader) == 7 and sorted(labels) == list(range(50))
    per_rank = [
        [x for _, y in dm(id_shards, val=str(id_shards), rank=r, world_size=2, num_workers=2).val_dataloader()
         for x in y.tolist()]
        for r in range(2)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 25 and sorted(per_rank[0] + per_rank[1]) == list(range(50))


def test_list_transform_gives_lists_of_batched_tensors(id_shards):
    images, labels = next(iter(dm(id_shards, train_transform=TwoViews()).train_dataloader()))
    assert isinstance(images, list) and [tuple(v.shape) for v in images] == [(4, 3, 8, 8), (4, 3, 4, 4)]
    assert labels.shape == (4,)


def test_info_json_lookup(tmp_path, id_shards):
    shard_dir = id_shards.parent
    info = load_shard_info(str(id_shards))
    assert info.num_samples == 50 and len(info.urls) == 7 and info.info_path == str(shard_dir / "train.json")
    assert default_info_path("https://host/my-bucket/val-000003.tar") == "https://host/my-bucket/val.json"
    subset = load_shard_info(str(shard_dir / "train-{000005..000006}.tar"))
    assert subset.num_samples == 10 and subset.shard_samples == [8, 2]
    # An explicit info path overrides the default; the JSON is needed.
    moved = tmp_path / "elsewhere.json"
    shutil.move(shard_dir / "train.json", moved)
    with pytest.raises(FileNotFoundError, match="train.json"):
        load_shard_info(str(id_shards))
    assert load_shard_info(str(id_shards), str(moved)).num_samples == 50
    # pipe: URLs stream through a command; they need an explicit info path.
    pipe = "pipe:cat " + str(shard_dir / "train-{000000..000006}.tar")
    with pytest.raises(ValueError, match="pipe"):
        load_shard_info(pipe)
    module = dm(pipe, train_info=str(moved), val=pipe, val_info=str(moved), batch_size=10)
    assert sorted(x for _, y in module.val_dataloader() for x in y.tolist()) == list(range(50))
    with pytest.raises(ValueError, match="not listed"):
        load_shard_info(str(shard_dir / "other-000000.tar"), str(moved))
    (shard_dir / "train-000006.tar").write_bytes(b"not a tar" * 100)  # listed, but unreadable
    with pytest.raises(ShardReadError, match="train-000006"):
        list(dm(shard_dir / "train-000006.tar", train_info=str(moved)).train_dataloader())


class _Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: dict = {}
        self.val_seen: list = []

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(batch[1].tolist())
        return self.layer(batch[0].mean((1, 2, 3))[:, None]).sum()

    def validation_step(self, batch, batch_idx):
        self.val_seen.extend(batch[1].tolist())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_trainer_knows_epoch_length_and_epoch_reaches_the_shuffle(id_shards):
    module = dm(id_shards, val=str(id_shards), batch_size=5, seed=3)
    model = _Recorder()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=module)
    assert trainer.num_training_batches == 10  # ceil(50 / 5) batches, known before the epoch
    expected = []
    for epoch in range(2):  # what the stream yields for that epoch on its own
        reference = dm(id_shards, batch_size=5, seed=3)
        reference.set_epoch(epoch)
        expected.append([x for _, y in reference.train_dataloader() for x in y.tolist()])
    assert model.seen[0] == expected[0] and model.seen[1] == expected[1] and expected[0] != expected[1]
    assert sorted(model.val_seen) == sorted(list(range(50)) * 2)  # validation after each epoch

    no_val = dm(id_shards, batch_size=25)
    assert no_val.val_dataloader() == []
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Recorder(), datamodule=no_val)
    assert trainer.num_training_batches == 2


# -- untrusted shards -----------------------------------------------------------------------------
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


@pytest.fixture
def hostile_shard(tmp_path, image_bytes):
    """12 samples: 0-9 good, 10 a truncated JPEG, 11 good but carrying a ``.pyd`` pickle payload."""
    marker = tmp_path / "pwned"
    with tarfile.open(tmp_path / "bad-000000.tar", "w") as tar:
        for i in range(12):
            data = image_bytes(i)
            _add(tar, f"{i:04d}.jpg", data[: len(data) // 2] if i == 10 else data)
            if i == 11:
                _add(tar, f"{i:04d}.pyd", pickle.dumps(_Touch(str(marker))))
            _add(tar, f"{i:04d}.cls", str(i).encode())
    info = {"num_samples": 12, "shards": ["bad-000000.tar"], "shard_samples": [12],
            "classes": [f"c{i}" for i in range(12)], "skipped": []}
    (tmp_path / "bad.json").write_text(json.dumps(info))
    # The payload is live: unpickling it does create the file it names.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Touch(str(probe))))
    assert probe.exists()
    return tmp_path / "bad-000000.tar", marker


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_sample_skipped_and_pickle_never_loaded(hostile_shard, num_workers, caplog):
    shard, marker = hostile_shard
    module = dm(shard, val=str(shard), batch_size=3, num_workers=num_workers, max_corrupt_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data.pipeline"):
        val = [x for _, y in module.val_dataloader() for x in y.tolist()]
        train = [x for _, y in module.train_dataloader() for x in y.tolist()]
    # the corrupt sample is replaced by the one after the reader's range (here: wraps to the start)
    assert 10 not in val and len(val) == 12 and set(val) == set(range(12)) - {10}
    assert 10 not in train and len(train) == 12 and set(train) == set(range(12)) - {10}
    assert not marker.exists()
    if num_workers == 0:  # counted (in this process) and logged with the shard's name
        stream = module.train_dataloader().dataset
        list(stream)
        assert stream.stats["corrupt"] == 1 and stream.stats["seen"] == 13
        assert stream.stats["by_source"] == {str(shard): 1}
        assert any("corrupt" in r.message and str(shard) in r.message for r in caplog.records)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_too_many_corrupt_samples_raise_naming_the_shard(hostile_shard, num_workers):
    shard, _ = hostile_shard
    module = dm(shard, batch_size=3, num_workers=num_workers, max_corrupt_fraction=0.05)
    with pytest.raises(CorruptDataError, match=r"max_corrupt_fraction=5\.00%.*bad-000000\.tar"):
        list(module.train_dataloader())


def test_corrupt_counter_waits_for_enough_samples():
    counter = CorruptCounter(max_fraction=0.1, where="test", min_checked=20)
    for i in range(5):
        counter.bad("s.tar", f"k{i}", "bad")  # 5 of 5 corrupt: not judged yet
    for _ in range(14):
        counter.good()
    counter.bad("s.tar", "k0", "bad")  # met again (a wrap-around): not counted twice
    with pytest.raises(CorruptDataError, match="6 of 20"):
        counter.bad("s.tar", "k5", "bad")  # the 20th sample: 6 / 20 > 0.1
