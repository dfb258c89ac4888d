"""Streaming webdataset shards: safe decoding, corrupt-sample accounting, exact per-rank epochs.

A shard is untrusted input. Only the members a sample needs are read out of the tar
(``.jpg``/``.jpeg``/``.png``/``.webp`` and ``.cls``; anything else, a ``.pyd`` pickle included, is
skipped by name before its bytes are read), images are decoded by PIL restricted to the JPEG, PNG and
WEBP decoders, and no pickle-based decoder ever runs.

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
A shard that cannot be opened or read as a tar raises :class:`ShardReadError` naming it.
"""
import io
import json
import logging
import math
import posixpath
import random
import re
import warnings
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from PIL import Image
from torch.utils.data import IterableDataset
from webdataset.filters import shuffle
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # member suffixes read as the image, in this priority
LABEL_KEY = "cls"
PIL_FORMATS = ("JPEG", "PNG", "WEBP")  # the only decoders PIL may use on untrusted bytes
FORMAT_KEYS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MIN_CHECKED_SAMPLES = 100


class CorruptSampleError(ValueError):
    """One sample cannot be decoded (it is skipped and counted)."""


class CorruptDataError(RuntimeError):
    """Too many corrupt samples: the data, not one sample, is broken."""


class ShardReadError(RuntimeError):
    """A shard cannot be opened or is not a readable tar stream."""


# -- decoding -------------------------------------------------------------------------------------
def open_image(data: bytes) -> Image.Image:
    """Decode image bytes fully with PIL's JPEG/PNG/WEBP decoders only (``image.format`` is kept).

    Raises:
        CorruptSampleError: the bytes are not a complete image in one of those formats, or the
            image is larger than PIL's decompression-bomb limit.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            image.load()
    except Exception as exc:  # PIL raises many types on hostile input; all mean "corrupt"
        raise CorruptSampleError(f"undecodable image ({type(exc).__name__}: {exc})") from exc
    return image


def decode_label(data: bytes, num_classes: int = 0) -> int:
    """ASCII integer class index; checked against ``num_classes`` when that is known (> 0)."""
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptSampleError(f"malformed .cls member {data[:20]!r}") from exc
    if label < 0 or (num_classes > 0 and label >= num_classes):
        raise CorruptSampleError(f"class index {label} outside [0, {num_classes})")
    return label


def decode_sample(sample: Dict[str, Any], num_classes: int = 0) -> Tuple[Image.Image, int]:
    """A raw webdataset sample (suffix -> bytes) -> (RGB PIL image, label); label -1 without ``.cls``."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise CorruptSampleError(f"no image member ({'/'.join('.' + k for k in IMAGE_KEYS)})")
    image = open_image(sample[key]).convert("RGB")
    label = decode_label(sample[LABEL_KEY], num_classes) if LABEL_KEY in sample else -1
    return image, label


def _wanted_member(name: str) -> bool:
    """Tar members to read: the image and label suffixes only (checked before any bytes are read)."""
    suffix = base_plus_ext(name)[1]
    return suffix is not None and suffix.lower() in (*IMAGE_KEYS, LABEL_KEY)


class CorruptCounter:
    """Counts decoded and corrupt samples of one reader and enforces ``max_fraction``.

    Args:
        max_fraction: largest tolerated ``corrupt / seen``.
        where: the reader, for messages (``"rank 0 worker 1"``).
        min_checked: samples to decode before the fraction is checked mid-epoch.
    """

    def __init__(self, max_fraction: float, where: str, min_checked: int = MIN_CHECKED_SAMPLES) -> None:
        self.max_fraction, self.where, self.min_checked = max_fraction, where, min_checked
        self.seen = 0
        self.corrupt = 0
        self.by_source: Counter = Counter()

    def good(self) -> None:
        self.seen += 1

    def bad(self, source: str, key: str, reason: str) -> None:
        self.seen += 1
        self.corrupt += 1
        self.by_source[source] += 1
        logger.warning("skipping corrupt sample %r of %s (%s): %s", key, source, self.where, reason)
        if self.seen >= self.min_checked:
            self.check()

    def check(self) -> None:
        """Raise :class:`CorruptDataError` when the fraction so far exceeds ``max_fraction``."""
        if self.seen and self.corrupt / self.seen > self.max_fraction:
            raise CorruptDataError(
                f"{self.corrupt} of {self.seen} samples read by {self.where} are corrupt "
                f"({self.corrupt / self.seen:.2%} > max_corrupt_fraction={self.max_fraction:.2%}); "
                f"corrupt samples by source: {dict(self.by_source)}"
            )

    def stats(self) -> Dict[str, Any]:
        return {"seen": self.seen, "corrupt": self.corrupt, "by_source": dict(self.by_source)}


# -- shard info -----------------------------------------------------------------------------------
@dataclass
class ShardInfo:
    """What a split's info JSON says about the shards a pattern names.

    Attributes:
        urls: the shard URLs (brace patterns and ``::`` lists expanded).
        shard_samples: samples per URL (``None`` when the JSON has no per-shard counts).
        num_samples: samples in these shards.
        classes: class names in index order (possibly empty).
        info_path: where the JSON was read.
    """

    urls: List[str]
    shard_samples: Optional[List[int]]
    num_samples: int
    classes: List[str]
    info_path: str


def default_info_path(url: str) -> str:
    """``<dirname>/<NAME>.json`` for a shard URL ``<dirname>/<NAME>-<index>.tar``."""
    if url.startswith("pipe:"):
        raise ValueError(f"cannot derive the info JSON location from the pipe: URL {url!r}; pass it explicitly")
    dirname, basename = posixpath.split(url)
    if "-" not in basename:
        raise ValueError(f"shard name {basename!r} is not NAME-INDEX.tar; pass the info JSON path explicitly")
    return posixpath.join(dirname, basename.rsplit("-", 1)[0] + ".json")


def _shard_name(url: str, known: Dict[str, int]) -> Optional[str]:
    candidates = re.findall(r"[^/\s'\"=:]+\.tar(?![\w.])", url)
    return next((c for c in reversed(candidates) if c in known), None)


def load_shard_info(shards: str, info: Optional[str] = None) -> ShardInfo:
    """Expand a shard pattern and read its sample counts from the info JSON.

    Args:
        shards: local path, brace pattern (``/d/train-{000000..000127}.tar``), ``::``-separated list
            or any URL webdataset opens (``pipe:...``, ``http://...``).
        info: the info JSON (path or URL); default ``<dirname>/<NAME>.json`` of the first shard.

    Raises:
        FileNotFoundError: the JSON cannot be read.
        ValueError: a malformed JSON, or a shard the JSON does not list.
    """
    urls = expand_urls(shards)
    if not shards or not urls:
        raise ValueError(f"no shards in {shards!r}")
    info_path = info or default_info_path(urls[0])
    try:
        stream = gopen(info_path, "rb")
        try:
            meta = json.loads(stream.read().decode("utf-8"))
        finally:
            stream.close()
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"cannot read the shard info JSON {info_path!r} ({exc}); it is written beside the shards by "
            "tools/make_shards.py, or pass its path as train_info/val_info"
        ) from exc
    for key, kind in (("num_samples", int), ("shards", list)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{info_path}: {key!r} missing or not a {kind.__name__}")
    classes = meta.get("classes") or []
    counts = meta.get("shard_samples")
    if counts is None:
        return ShardInfo(urls, None, int(meta["num_samples"]), [str(c) for c in classes], info_path)
    if len(counts) != len(meta["shards"]) or not all(isinstance(c, int) and c >= 0 for c in counts):
        raise ValueError(f"{info_path}: 'shard_samples' must be one count >= 0 per entry of 'shards'")
    known = dict(zip(meta["shards"], counts))
    shard_samples = []
    for url in urls:
        name = _shard_name(url, known)
        if name is None:
            raise ValueError(f"shard {url!r} is not listed in {info_path} (shards: {meta['shards'][:3]}...)")
        shard_samples.append(known[name])
    return ShardInfo(urls, shard_samples, sum(shard_samples), [str(c) for c in classes], info_path)


# -- the stream -----------------------------------------------------------------------------------
def _read_shard(url: str, start: int = 0, stop: Optional[int] = None) -> Iterator[Dict[str, Any]]:
    """Raw samples ``start:stop`` of one shard (suffix -> bytes, plus ``__key__``/``__url__``)."""
    try:
        stream = gopen(url, "rb")
    except Exception as exc:
        raise ShardReadError(f"cannot open shard {url}: {exc}") from exc
    try:
        files = tar_file_expander([dict(url=url, stream=stream)], select_files=_wanted_member)
        yield from islice(group_by_keys(files), start, stop)
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
        self.max_corrupt_fraction, self.num_classes = max_corrupt_fraction, num_classes
        self.epoch = 0
        self.stats: Dict[str, Any] = {}  # the last epoch's counts of the reader in this process

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the next iteration's shard order and shuffle."""
        self.epoch = int(epoch)

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
            yield from _read_shard(self.info.urls[order[i]], lo, lo + take)
            count -= take
            pos = (pos + take) % n

    def _resampled(self, rng: random.Random) -> Iterator[Dict[str, Any]]:
        while True:
            yield from _read_shard(rng.choice(self.info.urls))

    def _decoded(self, raw: Iterator[Dict[str, Any]], counter: CorruptCounter) -> Iterator[Tuple[Any, int]]:
        for sample in raw:
            try:
                image, label = decode_sample(sample, self.num_classes)
            except CorruptSampleError as exc:
                counter.bad(sample.get("__url__", "?"), sample.get("__key__", "?"), str(exc))
                continue
            counter.good()
            yield (image if self.transform is None else self.transform(image)), label

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Tuple[Any, int]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != self.workers:
            raise RuntimeError(
                f"ShardStream was laid out for {self.workers} DataLoader worker(s) but runs in {workers}; "
                "build the DataLoader with the same num_workers"
            )
        where = f"rank {self.rank} worker {worker} (epoch {self.epoch})"
        start, quota = self.reader_range(worker)
        counter = CorruptCounter(self.max_corrupt_fraction, where)
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        main = self._resampled(rng) if self.resampled else self._positions(start, quota)
        if self.train and self.shuffle_buffer > 1:
            main = shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(main)
        # Replacements for corrupt samples: the positions after this reader's range, one lap at most.
        tail = None if self.resampled else self._positions(start + quota, self.info.num_samples)
        yielded = 0
        for source in (main, tail):
            if source is None or yielded >= quota:
                continue
            for item in self._decoded(source, counter):
                yield item
                yielded += 1
                if yielded >= quota:
                    break
        if yielded < quota:
            raise CorruptDataError(f"{where} found only {yielded} readable samples of the {quota} it needs")
        counter.check()  # the whole epoch of this reader, however small
        self.stats = counter.stats()
        if counter.corrupt:
            logger.warning("%s skipped %d corrupt of %d samples", where, counter.corrupt, counter.seen)
