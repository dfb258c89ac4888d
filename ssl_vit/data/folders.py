"""The ImageFolder DataModule: :class:`ShardDataModule`'s interface over image folders not yet sharded."""
import math
import os
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler

from ssl_vit.data.datamodule import _BaseDataModule
from ssl_vit.data.decode import MIN_CHECKED_SAMPLES, CorruptCounter, CorruptSampleError, decode_hooks, decode_image
from ssl_vit.data.listing import list_images
from ssl_vit.data.resume import ResumableSampler, call_seeded, sample_seed
from ssl_vit.data.stall import DEFAULT_WORKER_TIMEOUT_S, WatchedLoader


class _ImageFiles(Dataset):
    """``(transform(image), label)`` of an ImageFolder listing; an unreadable file is logged, counted
    and replaced by the next readable one (so batches keep their size). With ``seed`` set (training),
    the transform of index ``i`` runs seeded by ``(seed, epoch, i)``. Files are decoded as the transform
    asks (its draft and JPEG decoder: :func:`ssl_vit.data.decode.decode_hooks`), as in the shards."""

    def __init__(self, root: str, max_corrupt_fraction: float, transform: Optional[Callable] = None) -> None:
        self.root, self.transform = root, transform
        listing = list_images(root)
        self.classes, self.items = listing.classes, listing.items
        if not self.items:
            raise ValueError(f"no files under {root!r}")
        self.max_corrupt_fraction, self.min_checked = max_corrupt_fraction, MIN_CHECKED_SAMPLES
        self.counter: Optional[CorruptCounter] = None  # one per process (each worker has its copy)
        self.seed: Optional[int] = None
        self.epoch = 0
        self.with_keys = False  # also return the file's path under root (feature extraction)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tuple[Any, ...]:
        image, label, path = self._read(index)
        return (image, label, os.path.relpath(path, self.root)) if self.with_keys else (image, label)

    def _read(self, index: int) -> Tuple[Any, int, str]:
        if self.counter is None:
            info = torch.utils.data.get_worker_info()
            where = f"{self.root} worker {0 if info is None else info.id}"
            self.counter = CorruptCounter(self.max_corrupt_fraction, where, self.min_checked)
        for step in range(len(self.items)):
            path, label = self.items[(index + step) % len(self.items)]
            try:
                with open(path, "rb") as f:
                    image = decode_image(f.read(), **decode_hooks(self.transform))
            except (OSError, CorruptSampleError) as exc:
                self.counter.bad(path, path, str(exc))
                continue
            self.counter.good()
            if self.transform is None:
                return image, label, path
            if self.seed is None:
                return self.transform(image), label, path
            return call_seeded(self.transform, image, sample_seed(self.seed, self.epoch, index)), label, path
        raise RuntimeError(f"no readable image under {self.root!r}")


class ImageFolderDataModule(_BaseDataModule):
    """The same interface over ImageFolder trees (``root/<class>/<image>``), for data not yet sharded;
    a folder with images and no sub-folder at its top level is read unlabelled (label -1, recursively:
    :func:`ssl_vit.data.listing.list_images`).

    Files that cannot be decoded (JPEG/PNG/WEBP only, as in the shards) are logged, counted and
    replaced by the next readable file; ``max_corrupt_fraction`` applies per DataLoader worker, checked
    once it has read ``min(100, its share of the epoch)`` files. Training batches are full
    (``drop_last``); the training order is ``DistributedSampler``'s (shuffled by ``seed + epoch``, on one
    rank too), so an epoch's order depends on its number only.

    Args:
        train: training ImageFolder root.
        val: validation ImageFolder root (optional).
        eval_train: labelled ImageFolder root read like ``val``: the bank of the k-NN monitor.
        batch_size, num_workers, train_transform, val_transform, seed, max_corrupt_fraction,
        pin_memory, rank, world_size, worker_timeout: as for :class:`ShardDataModule`.
    """

    def __init__(
        self,
        train: str,
        val: Optional[str] = None,
        eval_train: Optional[str] = None,
        batch_size: int = 64,
        num_workers: int = 4,
        train_transform: Optional[Callable] = None,
        val_transform: Optional[Callable] = None,
        seed: int = 0,
        max_corrupt_fraction: float = 0.01,
        pin_memory: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        worker_timeout: Optional[float] = DEFAULT_WORKER_TIMEOUT_S,
    ) -> None:
        super().__init__(
            batch_size, num_workers, train_transform, val_transform, seed, max_corrupt_fraction, pin_memory, rank,
            world_size, worker_timeout,
        )
        self.train, self.val, self.eval_train = train, val, eval_train
        self._datasets: dict = {}

    def _dataset(self, which: str) -> _ImageFiles:
        if which not in self._datasets:
            _, world_size = self.dist_info()
            dataset = _ImageFiles(getattr(self, which), self.max_corrupt_fraction)
            # A small epoch is judged whole: check once a worker has read its share of it.
            dataset.min_checked = min(MIN_CHECKED_SAMPLES, math.ceil(len(dataset) / (world_size * max(1, self.num_workers))))
            self._datasets[which] = dataset
        return self._datasets[which]

    def _train_meta(self) -> Tuple[List[str], int]:
        dataset = self._dataset("train")
        return dataset.classes, len(dataset)

    def classes_of(self, split: str) -> List[str]:
        return self._dataset(split).classes

    def _loader(self, which: str, train: bool, with_keys: bool = False) -> DataLoader:
        dataset = self._dataset(which)
        dataset.with_keys = with_keys
        dataset.transform = self.train_transform if train else self.val_transform
        dataset.seed = self.seed if train else None
        rank, world_size = self.dist_info()
        if not train:
            sampler: Any = (
                DistributedSampler(dataset, world_size, rank, shuffle=False) if world_size > 1
                else SequentialSampler(dataset)
            )
            return WatchedLoader(dataset, sampler=sampler, **self._loader_kwargs())
        if math.ceil(len(dataset) / world_size) < self.batch_size:
            raise ValueError(
                f"{self.train!r} has {len(dataset)} images: fewer than one batch of {self.batch_size} per rank"
            )
        sampler = ResumableSampler(dataset, world_size, rank, shuffle=True, seed=self.seed)

        def start(epoch: int, skip_batches: int) -> None:
            sampler.set_epoch(epoch)
            sampler.skip = skip_batches * self.batch_size
            dataset.epoch = epoch

        return self._train_loader(dataset, start, sampler=sampler, drop_last=True)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> Union[DataLoader, List[DataLoader]]:
        if self.val is None:
            return []
        self.setup()
        return self._loader("val", train=False)

    def _eval_loader(self, split: str, with_keys: bool = False) -> DataLoader:
        return self._loader(split, train=False, with_keys=with_keys)
