"""Data reads that cannot hang a run: timeouts on shard streams and on DataLoader workers.

Two things used to leave a run alive and silent for ever: a shard behind a ``pipe:`` command (or an
``http(s)://`` URL, which webdataset reads through ``curl``) that stops producing bytes, and a
DataLoader worker that stops (SIGSTOP, a deadlock, a transform that never returns).

**Read timeout** (``ShardDataModule(read_timeout=...)``, default :data:`DEFAULT_READ_TIMEOUT_S`):
:func:`open_shard` opens a shard with webdataset's ``gopen`` and, when the stream is a pipe or a
socket, waits at most ``read_timeout`` seconds for each read to deliver bytes. Past it, it kills the
command behind the pipe and raises :class:`ShardStallError` naming the shard. The default, 5 minutes
without a single byte (or, once the reader is done, without the command exiting), is far beyond an object store's first-byte latency and a client's retry
back-off (seconds to a minute), so reaching it means the source stalled. Local files are read
directly (``select`` cannot tell a stalled disk), and rely on the worker timeout.

**Worker timeout** (``worker_timeout`` of both DataModules, default
:data:`DEFAULT_WORKER_TIMEOUT_S`): the longest the main process waits for one batch from its workers
(:class:`WatchedLoader`). It is not the DataLoader's own ``timeout``: with that set, torch waits the
whole timeout in one call and stops checking every 5 s whether a worker died, so a worker killed by
the OOM killer went unreported for 10 minutes instead of 5 seconds. Past it the training loader raises :class:`WorkerStallError` naming
the worker that owed the batch. The default, 10 minutes, covers the slowest batch a healthy worker
makes: its start, opening a shard, filling the shuffle buffer and, when a run resumes mid-epoch,
reading past the samples already trained (a resume far into an epoch on slow storage may need more).
Both timeouts are off with 0 (or ``None``).
"""
import io
import os
import re
import select
import stat
import subprocess
import time
import weakref
from typing import Any, BinaryIO, Optional, Tuple

from torch.utils.data import DataLoader
from torch.utils.data._utils import MP_STATUS_CHECK_INTERVAL

from webdataset.gopen import gopen

from ssl_vit.data.decode import ShardReadError

DEFAULT_READ_TIMEOUT_S = 300.0
DEFAULT_WORKER_TIMEOUT_S = 600.0


class ShardStallError(ShardReadError):
    """A shard stream delivered no byte within the read timeout. ``str()`` stays the message even
    after webdataset's tar reader appends its context to ``args``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class WorkerStallError(RuntimeError):
    """A DataLoader worker made no batch within the worker timeout."""


def check_timeout(name: str, value: Optional[float]) -> float:
    """``value`` as seconds (``None`` -> 0, off); ``ValueError`` naming ``name`` unless finite and >= 0."""
    seconds = 0.0 if value is None else float(value)
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"{name} must be a number of seconds >= 0 (0 or None: no timeout), got {value!r}")
    return seconds


class _TimedReader(io.RawIOBase):
    """The raw side of a pipe/socket stream, each read waiting at most ``timeout`` seconds for bytes."""

    def __init__(self, stream: Any, raw: Any, url: str, timeout: float) -> None:
        super().__init__()
        self.stream, self.raw, self.url, self.timeout = stream, raw, url, timeout
        self.stalled = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        ready, _, _ = select.select([self.raw], [], [], self.timeout)
        if not ready:
            self.stalled = True
            process = getattr(self.stream, "proc", None)  # webdataset's Pipe: the command behind it
            if process is not None:
                process.kill()
            raise ShardStallError(
                f"shard {self.url}: no data for {self.timeout:g} s (the read timeout, ShardDataModule "
                "read_timeout): the command or server behind it stalled"
            )
        data = self.raw.read1(len(buffer))  # one read of what is there (at most len(buffer) bytes)
        buffer[: len(data)] = data
        check_status = getattr(self.stream, "check_status", None)  # Pipe: raise on the command's failure
        if check_status is not None:
            check_status()
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        process = getattr(self.stream, "proc", None)
        if process is not None:  # a command that sent its data but does not exit must not hang the close
            self.raw.close()  # a command still writing gets SIGPIPE
            try:
                process.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self.stalled = True
                process.kill()
                process.wait()
        try:
            self.stream.close()
        except OSError:
            if not self.stalled:  # a killed command's exit status says nothing new
                raise
        super().close()


def open_shard(url: str, read_timeout: float) -> BinaryIO:
    """Open ``url`` as webdataset does (``gopen``); a pipe or socket stream gets ``read_timeout``
    (seconds; 0: none) per read."""
    stream = gopen(url, "rb")
    if not read_timeout:
        return stream
    raw = getattr(stream, "stream", stream)  # webdataset's Pipe wraps the command's stdout
    try:
        mode = os.fstat(raw.fileno()).st_mode
    except (AttributeError, OSError, io.UnsupportedOperation):
        return stream
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)) or not hasattr(raw, "read1"):
        return stream
    return io.BufferedReader(_TimedReader(stream, raw, url, read_timeout))


_TORCH_TIMEOUT = re.compile(r"DataLoader timed out after (\d+(\.\d+)?) seconds")


def worker_stall_error(error: RuntimeError, batch: int, num_workers: int) -> Optional[WorkerStallError]:
    """The :class:`WorkerStallError` for torch's ``DataLoader timed out after N seconds`` while
    waiting for ``batch`` (counted from where the iterator started; in-order loading asks worker
    ``batch % num_workers`` for it while all workers run); ``None`` for any other error."""
    match = _TORCH_TIMEOUT.search(str(error))
    if match is None or num_workers < 1:
        return None
    return WorkerStallError(
        f"DataLoader worker {batch % num_workers} (of {num_workers}) made no batch for {float(match.group(1)):g} s "
        f"(waiting for batch {batch}; the worker timeout, the DataModule's worker_timeout): it is stopped "
        "(SIGSTOP?), stuck, or its data source stalled"
    )


class WatchedLoader(DataLoader):
    """A ``DataLoader`` whose ``worker_timeout`` (seconds, 0: none) bounds the wait for one batch from
    its workers, raising torch's own ``DataLoader timed out after N seconds`` (which
    :func:`worker_stall_error` turns into a :class:`WorkerStallError`).

    The wait is made of torch's own 5-second polls (``timeout=0``), each of which checks that every
    worker is alive, so a dead worker is still reported within seconds.
    """

    def __init__(self, *args: Any, worker_timeout: float = 0.0, **kwargs: Any) -> None:
        if kwargs.get("timeout"):
            raise ValueError("WatchedLoader: give worker_timeout, not timeout (see ssl_vit.data.stall)")
        super().__init__(*args, **kwargs)
        self.worker_timeout = float(worker_timeout or 0.0)

    def _get_iterator(self) -> Any:
        iterator = super()._get_iterator()
        if self.num_workers > 0 and self.worker_timeout > 0:
            _bound_the_wait(iterator, self.worker_timeout)
        return iterator


def _bound_the_wait(iterator: Any, timeout: float) -> None:
    """Make a multi-process loader iterator give up on a batch after ``timeout`` seconds of waiting
    (torch private API: ``_get_data`` waits for one batch, ``_try_get_data`` polls once)."""
    # The class's functions and a weak reference: bound methods stored on the instance would make a
    # reference cycle, the iterator would outlive its loop until a garbage collection, its workers
    # would not be shut down, and the interpreter's exit would wait for them for ever.
    get_data, try_get_data = type(iterator)._get_data, type(iterator)._try_get_data
    owner = weakref.ref(iterator)
    started = [0.0]

    def _get_data() -> Any:
        started[0] = time.monotonic()
        return get_data(owner())

    def _try_get_data(poll: float = MP_STATUS_CHECK_INTERVAL) -> Tuple[bool, Any]:
        waited = time.monotonic() - started[0]
        ok, data = try_get_data(owner(), max(0.01, min(poll, timeout - waited)))
        if not ok and time.monotonic() - started[0] >= timeout:
            raise RuntimeError(f"DataLoader timed out after {timeout:g} seconds")
        return ok, data

    iterator._get_data, iterator._try_get_data = _get_data, _try_get_data

