"""Counts that must not lie: each corrupt sample counted once, a stale shard JSON that under-counts
a shard stops the run naming it, and a full disk in make-shards leaves no temporary file."""
import errno
import json
import logging
from pathlib import Path

import pytest
import webdataset

from ssl_vit.data import EvalTransform, ImageFolderDataModule, ShardDataModule, write_shards
from ssl_vit.data.decode import ShardReadError

TO_TENSOR = EvalTransform(8, crop_pct=1.0)


def corrupt_records(caplog) -> list:
    return [r for r in caplog.records if r.getMessage().startswith("skipping corrupt sample")]


def test_a_corrupt_sample_met_twice_in_an_epoch_counts_once(tmp_path, image_bytes, caplog):
    shard = tmp_path / "bad-000000.tar"
    with webdataset.TarWriter(str(shard)) as writer:
        for i in range(12):
            writer.write({"__key__": f"{i:04d}", "jpg": image_bytes(i)[:40] if i == 0 else image_bytes(i), "cls": i})
    (tmp_path / "bad.json").write_text(json.dumps({"num_samples": 12, "shards": [shard.name], "shard_samples": [12]}))
    # Batch 5: the one reader pads its epoch to 15 positions, wrapping round the shard, so it meets
    # samples 0-2 twice; the corrupt sample 0 is one sample, skipped and counted once.
    module = ShardDataModule(str(shard), batch_size=5, num_workers=0, train_transform=TO_TENSOR, shuffle_buffer=0,
                             max_corrupt_fraction=0.5, pin_memory=False)
    stream = module.train_dataloader().dataset
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data.pipeline"):
        labels = [label for _, label in stream]
    assert len(labels) == 15 and 0 not in labels
    assert stream.stats["corrupt"] == 1 and stream.stats["by_source"] == {str(shard): 1}
    assert len(corrupt_records(caplog)) == 1


def test_adjacent_corrupt_files_count_once_each_in_an_image_folder(tmp_path, make_folder, caplog):
    files = sorted(make_folder(tmp_path / "src", [12]))
    for path in files[:2]:  # 000.jpg and 001.jpg: index 0 is replaced past both, index 1 meets 001 again
        Path(path).write_bytes(b"\xff\xd8 truncated")
    module = ImageFolderDataModule(str(tmp_path / "src"), val=str(tmp_path / "src"), batch_size=4, num_workers=0,
                                   val_transform=TO_TENSOR, max_corrupt_fraction=0.5, pin_memory=False)
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data.pipeline"):
        labels = [int(y) for _, batch in module.val_dataloader() for y in batch]
    assert len(labels) == 12
    assert sorted(r.getMessage().split("'")[1] for r in corrupt_records(caplog)) == files[:2]


def test_stale_json_that_under_counts_a_shard_is_an_error(tmp_path, make_folder):
    make_folder(tmp_path / "src", [4, 4])
    write_shards(tmp_path / "src", tmp_path / "out", "train", 4, progress=False)
    info_path = tmp_path / "out" / "train.json"
    info = json.loads(info_path.read_text())
    info["shard_samples"], info["num_samples"] = [3, 4], 7  # the first shard really holds 4
    info_path.write_text(json.dumps(info))
    pattern = str(tmp_path / "out" / "train-{000000..000001}.tar")
    for train in (True, False):
        module = ShardDataModule(pattern, val=pattern, batch_size=7, num_workers=0, train_transform=TO_TENSOR,
                                 val_transform=TO_TENSOR, shuffle_buffer=0, pin_memory=False)
        loader = module.train_dataloader() if train else (module.setup() or module.val_dataloader())
        with pytest.raises(ShardReadError, match=r"train-000000\.tar holds 4 samples, but .*train\.json says 3: "
                                                 r"the JSON is stale"):
            list(loader)


def test_full_disk_removes_temporary_shards_and_reports_the_first_error(tmp_path, make_folder, monkeypatch):
    make_folder(tmp_path / "src", [3, 3])
    real_write, real_close = webdataset.TarWriter.write, webdataset.TarWriter.close
    writes = []

    def write(self, sample):
        writes.append(sample["__key__"])
        if len(writes) >= 5:  # in the third shard the disk is full
            raise OSError(errno.ENOSPC, "No space left on device (write)")
        return real_write(self, sample)

    def close(self):
        if len(writes) >= 5:  # flushing the tar's end fails as well
            raise OSError(errno.ENOSPC, "No space left on device (close)")
        return real_close(self)

    monkeypatch.setattr(webdataset.TarWriter, "write", write)
    monkeypatch.setattr(webdataset.TarWriter, "close", close)
    with pytest.raises(OSError, match=r"\(write\)"):
        write_shards(tmp_path / "src", tmp_path / "out", "train", 2, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
