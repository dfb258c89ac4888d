"""Reads that cannot hang a run (:mod:`ssl_vit.data.stall`): a shard behind a ``pipe:`` command that
stops producing bytes, and a DataLoader worker that is stopped (SIGSTOP), each stop the run with an
error naming the shard or the worker, after the configured timeout. Each stalled thing here ends by
itself after ``STALL_S`` seconds, so a test of code without the timeouts ends too (and fails)."""
import gc
import os
import signal
import tarfile
import time
import weakref
from pathlib import Path
from typing import List

import pytest
import torch

from ssl_vit.data import EvalTransform, ImageFolderDataModule, ShardDataModule, write_shards
from ssl_vit.data.stall import ShardStallError, WatchedLoader, WorkerStallError

STALL_S = 30  # how long a stalled command / worker stays stalled when nothing ends it
TIMEOUT_S = 1.0
TO_TENSOR = EvalTransform(8, crop_pct=1.0)


@pytest.fixture
def shards(tmp_path, make_folder) -> Path:
    """8 96x96 JPEGs (larger than the tar reader's 10 kB records together), each its own class, in 2
    shards of 4."""
    make_folder(tmp_path / "src", [1] * 8, size=96)
    write_shards(tmp_path / "src", tmp_path / "shards", "train", 4, progress=False)
    return tmp_path / "shards"


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (gone or a zombie), waiting a little for it."""
    for _ in range(500):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.01)
    return False


def test_a_pipe_that_stops_producing_bytes_stops_the_run_naming_the_shard(shards, tmp_path):
    """The command sends the shard up to its last sample, then stalls."""
    shard, pid_file = shards / "train-000000.tar", tmp_path / "command.pid"
    with tarfile.open(shard) as tar:
        last = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1].offset
    url = f"pipe:echo $$ > {pid_file}; head -c {last} {shard}; exec sleep {STALL_S}"
    dm = ShardDataModule(url, train_info=str(shards / "train.json"), batch_size=1, num_workers=0,
                         train_transform=TO_TENSOR, shuffle_buffer=0, pin_memory=False, read_timeout=TIMEOUT_S)
    dm.setup("fit")
    labels: List[int] = []
    with pytest.raises(ShardStallError) as error:
        for _, batch_labels in dm.train_dataloader():
            labels += batch_labels.tolist()
    assert str(error.value) == (
        f"shard {url}: no data for 1 s (the read timeout, ShardDataModule read_timeout): "
        "the command or server behind it stalled"
    )
    assert labels  # the samples before the stall were used
    assert _gone(int(pid_file.read_text()))  # the stalled command was killed, not left behind


class StopWorker1:
    """The evaluation transform; worker 1 stops itself (SIGSTOP) on its first image, after writing
    its pid to ``path``; a background shell sends it SIGCONT after ``STALL_S`` seconds."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, image):
        if torch.utils.data.get_worker_info().id == 1:
            self.path.write_text(str(os.getpid()))
            os.system(f"(sleep {STALL_S}; kill -CONT {os.getpid()}) >/dev/null 2>&1 &")
            os.kill(os.getpid(), signal.SIGSTOP)
        return TO_TENSOR(image)


@pytest.mark.parametrize("kind", ["shards", "folder"])
def test_a_stopped_worker_stops_the_run_naming_it(kind, shards, tmp_path):
    pid_file = tmp_path / "worker1.pid"
    common = dict(batch_size=2, num_workers=2, train_transform=StopWorker1(pid_file), pin_memory=False,
                  worker_timeout=TIMEOUT_S)
    if kind == "shards":
        dm = ShardDataModule(str(shards / "train-{000000..000001}.tar"), shuffle_buffer=0, **common)
    else:
        dm = ImageFolderDataModule(str(tmp_path / "src"), **common)
    dm.setup("fit")
    batches, error = iter(dm.train_dataloader()), ""
    try:
        for _ in batches:
            pass
    except WorkerStallError as exc:  # not pytest.raises: its traceback would keep the workers alive
        error = str(exc)
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGCONT)  # the worker goes on, and exits when told to
        del batches  # shut the workers down now
    assert error.startswith("DataLoader worker 1 (of 2) made no batch for 1 s (waiting for batch 1; the worker "
                            "timeout, the DataModule's worker_timeout)"), error


@pytest.mark.parametrize("option", ["read_timeout", "worker_timeout"])
def test_timeouts_must_be_seconds(option, shards):
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"{option} must be a number of seconds >= 0"):
            ShardDataModule(str(shards / "train-000000.tar"), **{option: bad})
    assert getattr(ShardDataModule(str(shards / "train-000000.tar"), **{option: None}), option) == 0  # off


def test_a_watched_iterator_is_freed_with_its_loop(tmp_path):
    """The worker-timeout wrapper holds its iterator weakly: a cycle kept the iterator (and its
    workers) alive after the loop, and the interpreter's exit then waited for the workers for ever."""
    gc.disable()
    try:
        loader = WatchedLoader(list(range(8)), batch_size=4, num_workers=1, worker_timeout=30)
        iterator = iter(loader)
        assert next(iterator).tolist() == [0, 1, 2, 3]
        ref = weakref.ref(iterator)
        del iterator
        assert ref() is None  # freed by reference counting, workers shut down now
    finally:
        gc.enable()
