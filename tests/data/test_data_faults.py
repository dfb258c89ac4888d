"""Data faults during a run: a DataLoader worker that dies, a shard that disappears mid-epoch, a
truncated tar. Each stops the run with an error that says what happened and, for shards, which one.

Corrupt samples (skipped, counted, and the run stopped past ``max_corrupt_fraction`` naming the
shard) are tested in tests/data/test_data_pipeline.py.
"""
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import List

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ssl_vit.data import EvalTransform, ShardDataModule, write_shards
from ssl_vit.data.decode import ShardReadError

pytestmark = pytest.mark.slow  # processes, CLI training or end-to-end chains: `make test` only

TO_TENSOR = EvalTransform(8, crop_pct=1.0)


@pytest.fixture
def shards(tmp_path) -> Path:
    """32 8x8 images, each its own class (label == sample id), in 8 shards of 4."""
    rng = np.random.default_rng(0)
    for i in range(32):
        (tmp_path / "src" / f"c{i:03d}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "src" / f"c{i:03d}" / "0.jpg")
    write_shards(tmp_path / "src", tmp_path / "shards", "train", 4, progress=False)
    return tmp_path / "shards"


def datamodule(shards: Path, num_workers: int, transform=TO_TENSOR, pattern: str = "train-{000000..000007}.tar") -> ShardDataModule:
    return ShardDataModule(str(shards / pattern), batch_size=2, num_workers=num_workers, train_transform=transform,
                           shuffle_buffer=0, pin_memory=False)


class Linear(pl.LightningModule):
    """A linear classifier on 8x8 images: the cheapest module a Trainer can run."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3 * 8 * 8, 32)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self.net(images.flatten(1)), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class AtBatch(pl.Callback):
    """Calls ``action()`` once, after training batch ``index``."""

    def __init__(self, index: int, action) -> None:
        self.index, self.action, self.done = index, action, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == self.index and not self.done:
            self.done = True
            self.action()


def fit(dm: ShardDataModule, *callbacks: pl.Callback) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(Linear(), datamodule=dm)
    return trainer


# -- workers that die -------------------------------------------------------------------------------
@pytest.fixture
def file_system_sharing():
    """Workers hand batches over as named shared-memory files. With the default ``file_descriptor``
    strategy the main process fetches each batch's descriptor from the worker that made it, and a
    worker killed between sending a batch and that fetch surfaces as ``ConnectionResetError`` instead
    of torch's "DataLoader worker ... exited unexpectedly" (a race; see the report)."""
    before = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    yield
    torch.multiprocessing.set_sharing_strategy(before)


class ExitInWorker:
    """The evaluation transform, except that worker 1 calls ``os._exit(3)`` on its third image."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, image):
        self.calls += 1
        if torch.utils.data.get_worker_info().id == 1 and self.calls == 3:
            os._exit(3)
        return TO_TENSOR(image)


class RecordPid:
    """The evaluation transform; each worker writes its pid to ``<dir>/worker<id>.pid``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __call__(self, image):
        info = torch.utils.data.get_worker_info()
        partial = self.directory / f"worker{info.id}.pid.partial"
        partial.write_text(str(os.getpid()))
        os.replace(partial, self.directory / f"worker{info.id}.pid")  # never seen half-written
        return TO_TENSOR(image)


def test_worker_that_exits_stops_the_run_naming_the_worker(shards, file_system_sharing):
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid\(?s?\)? [\d, ]+\) exited unexpectedly"):
        fit(datamodule(shards, 2, ExitInWorker()))


def _wait_until_dead(pid: int) -> None:
    """Until ``pid`` is a zombie or gone (its exit is then visible to the DataLoader's checks)."""
    for _ in range(500):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)


def test_worker_killed_mid_epoch_stops_the_run(shards, tmp_path, file_system_sharing):
    """SIGKILL from outside (what the OOM killer does) after the first batch."""
    killed: List[int] = []

    def kill_worker_1() -> None:
        path = tmp_path / "worker1.pid"
        for _ in range(1000):  # worker 1 may not have decoded its first sample yet when batch 0 arrives
            if path.exists():
                break
            time.sleep(0.01)
        pid = int(path.read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        _wait_until_dead(pid)

    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid.*(killed by signal: Killed|exited unexpectedly)"):
        fit(datamodule(shards, 2, RecordPid(tmp_path)), AtBatch(0, kill_worker_1))
    assert killed


# -- shards that vanish or are cut ------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_shard_deleted_mid_epoch_stops_the_run_naming_it(shards, num_workers):
    dm = datamodule(shards, num_workers)
    dm.setup("fit")
    stream = dm.train_dataloader().dataset
    urls = [stream.info.urls[i] for i in stream.shard_order()]  # epoch 0's order
    # Reader 0 reads urls[0:4]: the first batch and the prefetched ones come from urls[0:2].
    victim = urls[3]
    with pytest.raises(ShardReadError, match=rf"cannot open shard {victim}"):
        fit(dm, AtBatch(0, lambda: os.remove(victim)))


def _truncate(path: Path, member: int, into_data: bool) -> List[int]:
    """Cut the tar at its ``member``-th member (inside its data, or at its header); returns the
    labels of the samples wholly before the cut."""
    data = path.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        names = {m.name for m in members[:member]}
        before = [int(tar.extractfile(m).read()) for m in members[:member]
                  if m.name.endswith(".cls") and m.name.replace(".cls", ".jpg") in names]
    cut = members[member].offset_data + 10 if into_data else members[member].offset
    path.write_bytes(data[:cut])
    return before


def _read_until_error(dm: ShardDataModule) -> tuple:
    labels: List[int] = []
    with pytest.raises(ShardReadError) as info:
        for _, batch_labels in dm.train_dataloader():
            labels += batch_labels.tolist()
    return labels, str(info.value)


def test_tar_cut_inside_a_member_is_reported_after_its_earlier_samples(shards):
    """Only the tar reader notices a cut inside a member; the samples before it are used."""
    dm = datamodule(shards, 0, pattern="train-{000000..000001}.tar")  # 8 samples, one reader
    dm.setup("fit")
    stream = dm.train_dataloader().dataset
    second = stream.info.urls[stream.shard_order()[1]]
    before = _truncate(Path(second), member=5, into_data=True)  # inside the 3rd sample's 2nd member
    assert len(before) == 2
    labels, error = _read_until_error(dm)
    assert f"cannot read shard {second}" in error and "unexpected end of data" in error
    first = stream.info.urls[stream.shard_order()[0]]
    assert len(labels) == 6 and set(before) <= set(labels)  # 4 of the first shard, 2 of the cut one
    assert first != second


def test_tar_cut_at_a_member_boundary_is_reported_too(shards):
    """Cut at a header, tarfile sees a clean end of archive: only the JSON's count tells."""
    dm = datamodule(shards, 0, pattern="train-{000000..000001}.tar")
    dm.setup("fit")
    stream = dm.train_dataloader().dataset
    second = stream.info.urls[stream.shard_order()[1]]
    before = _truncate(Path(second), member=4, into_data=False)
    labels, error = _read_until_error(dm)
    assert f"shard {second} ended after 2 samples" in error
    assert set(before) <= set(labels)
