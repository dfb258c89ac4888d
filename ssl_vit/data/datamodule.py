"""LightningDataModules: webdataset shards (:class:`ShardDataModule`) or an ImageFolder tree
(:class:`ssl_vit.data.folders.ImageFolderDataModule`), with one interface and one small base.

Splits: ``train`` (what the run trains on, labelled or not), ``val`` (held-out, labelled) and
``eval_train`` (a labelled copy of the training data read like ``val``: the bank of the k-NN monitor,
``ssl_vit.training.knn_monitor.KNNMonitor``), so every path a run reads is one ``--data.*`` option.

Batches are ``(images, labels)``: ``images`` a float tensor ``[B, C, H, W]``, or a list of such
tensors (one per view) when the transform returns a list; ``labels`` a LongTensor ``[B]`` (-1 where
a shard has no ``.cls``). Both expose ``batch_size``, ``classes``, ``num_classes`` and
``num_train_samples``.

Rank and world size come from ``torch.distributed`` when it is initialised, else from the
``rank``/``world_size`` arguments (to simulate a rank), else 0/1. The shuffle of epoch ``e`` is seeded
by ``seed + e``; under a Trainer ``e`` is ``trainer.current_epoch``, read each time the train loader
starts an epoch, otherwise the value given to :meth:`set_epoch`. DataLoader workers are not persistent,
so each epoch's workers see the new epoch.

**Resume.** Training loaders are :class:`ssl_vit.data.resume.ResumableLoader`: an epoch starts at
the batch the training loop has reached (:meth:`_BaseDataModule.train_position`), so a run resumed
from a mid-epoch checkpoint reads exactly the rest of the interrupted epoch, and training
augmentations are seeded per sample (``ShardDataModule``: by seed, epoch, rank, reader and position
in the reader's epoch; ``ImageFolderDataModule``: by seed, epoch and file index, independent of
ranks and workers). Both are exact when the resumed run has the same batch size, ``num_workers``
(shards) and world size, and, for shards, when the skipped part held no corrupt sample.
"""
import logging
import signal
from typing import Any, Callable, List, Optional, Tuple, Union

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from ssl_vit.data.pipeline import ShardStream
from ssl_vit.data.resume import ResumableLoader
from ssl_vit.data.shard_info import ShardInfo, load_shard_info
from ssl_vit.data.transforms import EvalTransform, PretrainTransform

logger = logging.getLogger(__name__)


def _ignore_requeue_signal(worker_id: int) -> None:
    """DataLoader workers ignore SIGUSR1: SLURM sends it to every process of a task before the time
    limit, and only the main process acts on it (``ssl_vit.training.Preemption``). Workers started
    with ``spawn``/``forkserver`` would otherwise die of it (its default action is to terminate)."""
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class _BaseDataModule(pl.LightningDataModule):
    """What both DataModules share: arguments, transforms, rank/epoch lookup, loader options."""

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        train_transform: Optional[Callable],
        val_transform: Optional[Callable],
        seed: int,
        max_corrupt_fraction: float,
        pin_memory: bool,
        rank: Optional[int],
        world_size: Optional[int],
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0 <= max_corrupt_fraction <= 1:
            raise ValueError(f"max_corrupt_fraction must be in [0, 1], got {max_corrupt_fraction}")
        if world_size is not None and world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if rank is not None and not 0 <= rank < (world_size or 1):
            raise ValueError(f"rank must be in [0, world_size={world_size or 1}), got {rank}")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_transform = PretrainTransform() if train_transform is None else train_transform
        self.val_transform = EvalTransform() if val_transform is None else val_transform
        self.max_corrupt_fraction, self.pin_memory = max_corrupt_fraction, pin_memory
        self._rank, self._world_size = rank, world_size
        self._epoch = 0

    # -- subclasses provide these -----------------------------------------------------------------
    def _train_meta(self) -> Tuple[List[str], int]:
        """``(classes, number of training samples)``."""
        raise NotImplementedError

    def classes_of(self, split: str) -> List[str]:
        """Class names of ``split`` (``train``, ``val`` or ``eval_train``; empty when unlabelled)."""
        raise NotImplementedError

    def _eval_loader(self, split: str, with_keys: bool = False) -> DataLoader:
        """Every sample of ``split`` once, with the evaluation transform (``with_keys``: batches
        ``(images, labels, keys)``, the key naming the sample in its shard or folder)."""
        raise NotImplementedError

    @property
    def predict_splits(self) -> List[str]:
        """The splits ``ssl-vit predict`` embeds, in ``dataloader_idx`` order: ``train``, then ``val`` if given."""
        return [split for split in ("train", "val") if getattr(self, split) is not None]

    def predict_dataloader(self) -> List[DataLoader]:
        """One loader per :attr:`predict_splits`: every sample once, evaluation transform, with keys."""
        self.setup()
        return [self._eval_loader(split, with_keys=True) for split in self.predict_splits]

    # -- shared ------------------------------------------------------------------------------------
    @property
    def classes(self) -> List[str]:
        """Class names in label order (empty when the data has none)."""
        return self._train_meta()[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_train_samples(self) -> int:
        return self._train_meta()[1]

    def dist_info(self) -> Tuple[int, int]:
        """``(rank, world_size)`` of this process."""
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return self._rank or 0, self._world_size or 1

    def eval_train_dataloader(self) -> DataLoader:
        """The ``eval_train`` split (the k-NN bank), read like ``val``: every sample once, evaluation transform.

        Raises:
            ValueError: no ``eval_train`` was given.
        """
        if self.eval_train is None:
            raise ValueError(f"{type(self).__name__} has no eval_train split: give --data.eval_train (labelled "
                             "images read with the evaluation transform, e.g. the training data again)")
        self.setup()
        return self._eval_loader("eval_train")

    def set_epoch(self, epoch: int) -> None:
        """The epoch seeding the shuffle when no Trainer is attached."""
        self._epoch = int(epoch)

    def current_epoch(self) -> int:
        trainer = self.trainer
        return trainer.current_epoch if trainer is not None else self._epoch

    def train_position(self) -> Tuple[int, int]:
        """``(epoch, batches of it already trained)`` where the next training epoch starts: under a
        training Trainer, its current epoch and the batches its loop has consumed in it (non-zero
        only when resuming mid-epoch); otherwise ``(set_epoch value, 0)``."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return self.current_epoch(), 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def _train_loader(
        self, dataset: Dataset, start_fn: Callable[[int, int], None], workers_matter: bool, **kwargs: Any
    ) -> DataLoader:
        """The training loader (``workers_matter``: the sample order depends on ``num_workers``)."""
        _, world_size = self.dist_info()
        layout = dict(batch_size=self.batch_size, world_size=world_size)
        if workers_matter:
            layout["num_workers"] = self.num_workers
        return ResumableLoader(
            dataset, self.train_position, start_fn, layout, seed=self.seed, **self._loader_kwargs(), **kwargs
        )

    def _loader_kwargs(self) -> dict:
        return dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=False,
            worker_init_fn=_ignore_requeue_signal,
        )

    def setup(self, stage: Optional[str] = None) -> None:
        """List every given split and check that the labelled ones have the same classes."""
        splits = {s: getattr(self, s) for s in ("train", "val", "eval_train") if getattr(self, s) is not None}
        labelled = [(s, self.classes_of(s)) for s in splits]
        labelled = [(s, classes) for s, classes in labelled if classes]
        for split, classes in labelled[1:]:
            if classes != labelled[0][1]:
                raise ValueError(f"the classes of the {split} data ({splits[split]}) differ from those of the "
                                 f"{labelled[0][0]} data ({splits[labelled[0][0]]})")


class ShardDataModule(_BaseDataModule):
    """Streams webdataset shards written by ``tools/make_shards.py`` (see :mod:`ssl_vit.data.pipeline`).

    Args:
        train: training shards: a path, brace pattern (``/d/train-{000000..000127}.tar``), ``::`` list
            or any URL webdataset opens (``pipe:aws s3 cp s3://b/train-000000.tar -``, ``https://...``).
        val: validation shards, same forms (optional).
        train_info: the training info JSON; default ``<dirname>/<NAME>.json`` of the first shard.
            Required for ``pipe:`` URLs.
        val_info: the same for ``val``.
        eval_train: labelled shards read like ``val`` (every sample once, ``val_transform``): the bank
            of the k-NN monitor. Often the training shards again.
        eval_train_info: the same as ``train_info`` for ``eval_train``.
        batch_size: per-device batch size.
        num_workers: DataLoader workers per rank.
        train_transform: PIL image -> tensor or list of tensors (default ``PretrainTransform()``).
        val_transform: PIL image -> tensor (default ``EvalTransform()``).
        resampled: draw training shards with replacement (many nodes, few shards).
        seed: shard-order and shuffle seed (plus the epoch).
        shuffle_buffer: samples in each reader's shuffle buffer.
        max_corrupt_fraction: tolerated fraction of corrupt samples per reader.
        pin_memory: pin batches (when CUDA is available).
        rank: this process's rank when ``torch.distributed`` is not initialised.
        world_size: the number of ranks when ``torch.distributed`` is not initialised.
    """

    def __init__(
        self,
        train: str,
        val: Optional[str] = None,
        train_info: Optional[str] = None,
        val_info: Optional[str] = None,
        eval_train: Optional[str] = None,
        eval_train_info: Optional[str] = None,
        batch_size: int = 64,
        num_workers: int = 4,
        train_transform: Optional[Callable] = None,
        val_transform: Optional[Callable] = None,
        resampled: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        max_corrupt_fraction: float = 0.01,
        pin_memory: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        super().__init__(
            batch_size, num_workers, train_transform, val_transform, seed, max_corrupt_fraction, pin_memory, rank, world_size
        )
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.train, self.val, self.train_info, self.val_info = train, val, train_info, val_info
        self.eval_train, self.eval_train_info = eval_train, eval_train_info
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self._infos: dict = {}

    def _info(self, which: str) -> ShardInfo:
        if which not in self._infos:
            shards, info = {"train": (self.train, self.train_info), "val": (self.val, self.val_info),
                            "eval_train": (self.eval_train, self.eval_train_info)}[which]
            self._infos[which] = load_shard_info(shards, info)
        return self._infos[which]

    def _train_meta(self) -> Tuple[List[str], int]:
        info = self._info("train")
        return info.classes, info.num_samples

    def classes_of(self, split: str) -> List[str]:
        return self._info(split).classes

    def _stream(self, which: str, train: bool, with_keys: bool = False) -> ShardStream:
        rank, world_size = self.dist_info()
        return ShardStream(
            self._info(which),
            self.train_transform if train else self.val_transform,
            self.batch_size,
            train=train,
            rank=rank,
            world_size=world_size,
            num_workers=self.num_workers,
            resampled=self.resampled,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            max_corrupt_fraction=self.max_corrupt_fraction,
            num_classes=len(self.classes_of(which)),
            with_keys=with_keys,
        )

    def train_dataloader(self) -> DataLoader:
        """``len()`` is the number of (full) batches per epoch on this rank, equal on every rank."""
        stream = self._stream("train", train=True)
        return self._train_loader(stream, stream.set_epoch, workers_matter=True)

    def val_dataloader(self) -> Union[DataLoader, List[DataLoader]]:
        """Every validation sample once (padded to equal counts per rank, see pipeline); [] without val."""
        if self.val is None:
            return []
        self.setup()
        return self._eval_loader("val")

    def _eval_loader(self, split: str, with_keys: bool = False) -> DataLoader:
        return DataLoader(self._stream(split, train=False, with_keys=with_keys), **self._loader_kwargs())
