"""Streaming webdataset shards: safe decoding, corrupt-sample accounting, exact per-rank epochs.

A shard is untrusted input: samples are decoded by :mod:`ssl_vit.data.decode` (image and class
members only, PIL restricted to JPEG/PNG/WEBP, nothing unpickled); the shard info JSON is read and
checked by :mod:`ssl_vit.data.shard_info`.

**Epochs.** The shard info JSON (written by :func:`ssl_vit.data.shards.write_shards`) gives every
shard's sample count, so an epoch is laid out as one sequence of ``N`` samples: the shards in an
order shuffled by ``seed + epoch`` (the same on every rank), concatenated. With ``G = world_size *
num_workers`` readers, reader ``g = rank * num_workers + worker`` reads the ``q`` positions starting at
``floor(g * N / G)`` (wrapping around at ``N``), where ``q = ceil(N / (G * batch_size)) * batch_size``.
So every sample is read at least once per epoch, at most ``G * q - N < G * batch_size`` are read twice
(the padding), and every rank yields exactly ``num_workers * q / batch_size`` full batches: no DDP
hang, whatever the shard sizes. A reader starting inside a shard streams past the samples before
its start. Within a reader, samples pass through a shuffle buffer (raw bytes, seeded by seed, epoch,
rank and worker). With ``resampled=True`` each reader instead draws whole shards with replacement
(for many nodes and few shards) and stops after its ``q`` samples.

Validation reads the shards in the order given, without shuffling: rank ``r`` reads ``ceil(N /
world_size)`` positions from ``floor(r * N / world_size)`` (so with more than one rank, up to
``world_size - 1`` samples are read twice, as with ``DistributedSampler``), split across its workers
in whole batches; with one rank every sample is read exactly once.

**Corrupt samples** (undecodable image, no image member, a malformed ``.cls``) are skipped, logged
and counted, and replaced by the samples that follow the reader's range, so the counts above still
hold. The fraction is evaluated per reader (one DataLoader worker of one rank) over the samples it has
decoded in the current epoch: after each corrupt sample once at least ``min_checked`` (100) samples
were decoded, and at the end of the reader's epoch whatever the count (a small epoch is judged
whole). Past ``max_corrupt_fraction`` the reader raises :class:`CorruptDataError` naming the shards.
A shard that cannot be opened or read as a tar raises :class:`ShardReadError` naming it, as does one
that holds fewer or more samples than the info JSON says (a stale JSON), with both counts. One behind a
pipe or socket that delivers no byte for ``read_timeout`` seconds raises
:class:`~ssl_vit.data.stall.ShardStallError` naming it (see :mod:`ssl_vit.data.stall`).

**Resuming part-way** (``set_epoch(epoch, skip_batches)``, see :mod:`ssl_vit.data.resume`). The
DataLoader takes whole batches from its ``W`` workers in turn (batch ``i`` from worker ``i % W``) and
restarts at worker 0, so worker ``p`` plays reader ``(p + skip) % W`` and drops, read but not decoded,
the samples of the batches that reader had delivered. Exact unless a dropped sample was corrupt.
Training transforms are seeded per sample by ``(seed, epoch, rank, reader, position)``.
"""
import logging
import math
import random
from bisect import bisect_right
from collections import deque
from itertools import islice
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import IterableDataset
from webdataset.filters import shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from ssl_vit.data.decode import (
    CorruptCounter,
    CorruptDataError,
    CorruptSampleError,
    ShardReadError,
    decode_hooks,
    decode_sample,
    wanted_member,
)
from ssl_vit.data.resume import call_seeded, sample_seed
from ssl_vit.data.shard_info import ShardInfo
from ssl_vit.data.stall import open_shard

logger = logging.getLogger(__name__)


# -- the stream -----------------------------------------------------------------------------------
def read_shard(
    url: str, start: int = 0, stop: Optional[int] = None, read_timeout: float = 0.0
) -> Iterator[Dict[str, Any]]:
    """Raw samples ``start:stop`` of one shard (suffix -> bytes, plus ``__key__``/``__url__``); a pipe or
    socket stream waits at most ``read_timeout`` seconds (0: for ever) for each read."""
    try:
        stream = open_shard(url, read_timeout)
    except Exception as exc:
        raise ShardReadError(f"cannot open shard {url}: {exc}") from exc
    try:
        files = tar_file_expander([dict(url=url, stream=stream)], select_files=wanted_member)
        yield from islice(group_by_keys(files), start, stop)
    except ShardReadError:
        raise
    except Exception as exc:  # tarfile.ReadError, OSError, a duplicate member name (ValueError)...
        raise ShardReadError(f"cannot read shard {url}: {exc}") from exc
    finally:
        stream.close()


class ShardStream(IterableDataset):
    """One rank's samples of a shard set, as ``(transform(image), label)``; see the module docstring.

    Args:
        info: the shards and their counts (:func:`load_shard_info`).
        transform: PIL RGB image -> tensor (or list of tensors); ``None`` yields the PIL image.
        batch_size: the per-rank batch size the DataLoader will use.
        train: training layout (shuffled, padded to whole batches) or validation layout.
        rank, world_size: this process's place in the job.
        num_workers: the DataLoader's ``num_workers`` (0: the main process reads).
        resampled: draw shards with replacement (training only).
        seed: shard-order and shuffle-buffer seed (combined with the epoch).
        shuffle_buffer: samples held by each reader's shuffle buffer (0 or 1: no shuffling).
        max_corrupt_fraction: tolerated fraction of corrupt samples per reader.
        num_classes: labels must lie in ``[0, num_classes)`` (0: unchecked).
        with_keys: yield ``(image, label, key)``, ``key`` the sample's ``__key__`` in its shard
            (feature extraction: which sample each row is).
        read_timeout: seconds a read from a pipe/socket shard may wait for bytes (0: for ever).
    """

    def __init__(
        self,
        info: ShardInfo,
        transform: Optional[Callable],
        batch_size: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        resampled: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        max_corrupt_fraction: float = 0.01,
        num_classes: int = 0,
        with_keys: bool = False,
        read_timeout: float = 0.0,
    ) -> None:
        super().__init__()
        if info.num_samples < 1:
            raise ValueError(f"{info.info_path}: no samples")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if not resampled and info.shard_samples is None:
            raise ValueError(
                f"{info.info_path} has no 'shard_samples' (per-shard counts, written by tools/make_shards.py), "
                "which exact epochs need; add them or use resampled=True"
            )
        self.info, self.transform, self.batch_size, self.train = info, transform, batch_size, train
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.resampled = resampled and train
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.max_corrupt_fraction, self.num_classes, self.with_keys = max_corrupt_fraction, num_classes, with_keys
        self.read_timeout = read_timeout
        self.epoch = 0
        self.skip_batches = 0
        self.stats: Dict[str, Any] = {}  # the last epoch's counts of the reader in this process

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Set the epoch that seeds the next iteration's shard order and shuffle, and how many of this
        rank's batches of it to skip (training only; see "Resuming part-way" above)."""
        if skip_batches < 0 or (skip_batches and not self.train):
            raise ValueError(f"skip_batches must be >= 0 and only used for training, got {skip_batches}")
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)

    # -- layout ------------------------------------------------------------------------------------
    def _train_quota(self) -> int:
        readers = self.world_size * self.workers
        return math.ceil(self.info.num_samples / (readers * self.batch_size)) * self.batch_size

    def __len__(self) -> int:
        """Samples this rank yields per epoch."""
        if self.train:
            return self.workers * self._train_quota()
        return math.ceil(self.info.num_samples / self.world_size)

    def reader_range(self, worker: int) -> Tuple[int, int]:
        """``(start, count)``: the epoch positions worker ``worker`` of this rank reads."""
        n = self.info.num_samples
        if self.train:
            readers = self.world_size * self.workers
            return (self.rank * self.workers + worker) * n // readers, self._train_quota()
        per_rank, bs = len(self), self.batch_size
        batches = math.ceil(per_rank / bs)
        first, last = worker * batches // self.workers, (worker + 1) * batches // self.workers
        return self.rank * n // self.world_size + first * bs, max(0, min(last * bs, per_rank) - first * bs)

    def shard_order(self) -> List[int]:
        """Shard indices in this epoch's order (shuffled by ``seed + epoch`` for training)."""
        order = list(range(len(self.info.urls)))
        if self.train:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def _positions(self, start: int, count: int) -> Iterator[Dict[str, Any]]:
        """Raw samples at epoch positions ``[start, start + count)``, wrapping around at ``N``."""
        order, counts = self.shard_order(), self.info.shard_samples
        offsets = [0]
        for index in order:
            offsets.append(offsets[-1] + counts[index])
        n = offsets[-1]
        pos = start % n
        while count > 0:
            i = bisect_right(offsets, pos) - 1
            lo = pos - offsets[i]
            take = min(counts[order[i]] - lo, count)
            url, read = self.info.urls[order[i]], 0
            # Reaching the shard's end, read one sample more: a shard holding more than the JSON says
            # would silently lose the rest every epoch. The last sample waits until that is known.
            at_end = lo + take == counts[order[i]]
            pending = None
            for sample in read_shard(url, lo, lo + take + int(at_end), self.read_timeout):
                read += 1
                if read > take:
                    raise ShardReadError(self._stale_message(url, counts[order[i]]))
                if at_end and read == take:
                    pending = sample
                    continue
                yield sample
            if pending is not None:
                yield pending
            if read < take:  # a tar cut at a member boundary, or rewritten, ends early without an error
                raise ShardReadError(
                    f"shard {url} ended after {lo + read} samples, but {self.info.info_path} says it holds "
                    f"{counts[order[i]]}: it is truncated or was rewritten"
                )
            count -= take
            pos = (pos + take) % n

    def _stale_message(self, url: str, expected: int) -> str:
        try:
            held = str(sum(1 for _ in read_shard(url, read_timeout=self.read_timeout)))
        except ShardReadError:
            held = f"at least {expected + 1}"
        return (
            f"shard {url} holds {held} samples, but {self.info.info_path} says {expected}: the JSON is stale "
            "and the rest would be skipped every epoch; write it again (tools/make_shards.py, or "
            "tools/index_shards.py --overwrite for shards written elsewhere)"
        )

    def _resampled(self, rng: random.Random) -> Iterator[Dict[str, Any]]:
        while True:
            yield from read_shard(rng.choice(self.info.urls), read_timeout=self.read_timeout)

    def _decoded(self, raw: Iterator[Dict[str, Any]], counter: CorruptCounter) -> Iterator[Tuple[Any, int, str]]:
        for sample in raw:
            try:
                image, label = decode_sample(sample, self.num_classes, **decode_hooks(self.transform))
            except CorruptSampleError as exc:
                counter.bad(sample.get("__url__", "?"), sample.get("__key__", "?"), str(exc))
                continue
            counter.good()
            yield image, label, sample.get("__key__", "")

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Tuple[Any, int]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != self.workers:
            raise RuntimeError(
                f"ShardStream was laid out for {self.workers} DataLoader worker(s) but runs in {workers}; "
                "build the DataLoader with the same num_workers"
            )
        skip = self.skip_batches
        reader = (worker + skip) % workers
        delivered = (skip - reader + workers - 1) // workers  # batches i < skip with i % workers == reader
        return self._iterate(reader, delivered * self.batch_size)

    def _iterate(self, worker: int, skip: int) -> Iterator[Tuple[Any, int]]:
        """Reader ``worker`` of this rank: its epoch from position ``skip`` on."""
        where = f"rank {self.rank} worker {worker} (epoch {self.epoch})"
        start, quota = self.reader_range(worker)
        counter = CorruptCounter(self.max_corrupt_fraction, where)
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        main = self._resampled(rng) if self.resampled else self._positions(start, quota)
        if self.train and self.shuffle_buffer > 1:
            main = shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(main)
        deque(islice(main, skip), maxlen=0)  # the samples already trained: read, not decoded
        # Replacements for corrupt samples: the positions after this reader's range, one lap at most.
        tail = None if self.resampled else self._positions(start + quota, self.info.num_samples)
        yielded = skip
        for source in (main, tail):
            if source is None or yielded >= quota:
                continue
            for image, label, key in self._decoded(source, counter):
                if self.transform is not None and self.train:
                    seed = sample_seed(self.seed, self.epoch, self.rank, worker, yielded)
                    image = call_seeded(self.transform, image, seed)
                elif self.transform is not None:
                    image = self.transform(image)
                yield (image, label, key) if self.with_keys else (image, label)
                yielded += 1
                if yielded >= quota:
                    break
        if yielded < quota:
            raise CorruptDataError(f"{where} found only {yielded} readable samples of the {quota} it needs")
        counter.check()  # the whole epoch of this reader, however small
        self.stats = counter.stats()
        if counter.corrupt:
            logger.warning("%s skipped %d corrupt of %d samples", where, counter.corrupt, counter.seen)
