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

**Timeouts** (:mod:`ssl_vit.data.stall`). ``worker_timeout`` (both, default 600 s) bounds the wait for
one batch from the workers; ``read_timeout`` (shards, default 300 s) bounds each read from a shard
behind a pipe or socket. Past either, the run stops naming the worker or the shard; 0 or None: off.
DataLoader workers ignore the signals the main process answers (:mod:`ssl_vit.data.workers`).
"""
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from ssl_vit.data.pipeline import ShardStream
from ssl_vit.data.resume import ResumableLoader
from ssl_vit.data.shard_info import ShardInfo, load_shard_info
from ssl_vit.data.stall import DEFAULT_READ_TIMEOUT_S, DEFAULT_WORKER_TIMEOUT_S, WatchedLoader, check_timeout
from ssl_vit.data.transforms import EvalTransform, PretrainTransform
from ssl_vit.data.workers import IgnoreSignals

logger = logging.getLogger(__name__)


class _BaseDataModule(pl.LightningDataModule):
    """What both DataModules share: arguments, transforms, rank/epoch lookup, loader options."""

    workers_matter = False  # whether the sample order within an epoch depends on num_workers

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
        worker_timeout: Optional[float],
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
        self.worker_timeout = check_timeout("worker_timeout", worker_timeout)
        self._resumed: Optional[Dict[str, Any]] = None  # a checkpoint's data state (load_state_dict)
        self._last_train_loader: Optional[ResumableLoader] = None
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

    def _train_layout(self) -> Dict[str, int]:
        """The settings the training order within an epoch depends on (a mid-epoch position is exact
        only under the same ones)."""
        _, world_size = self.dist_info()
        layout = dict(batch_size=self.batch_size, world_size=world_size, seed=self.seed)
        if self.workers_matter:
            layout["num_workers"] = self.num_workers
        return layout

    def _train_loader(self, dataset: Dataset, start_fn: Callable[[int, int], None], **kwargs: Any) -> DataLoader:
        loader = ResumableLoader(
            dataset, self.train_position, start_fn, self._train_layout(), seed=self.seed, **self._loader_kwargs(),
            **kwargs,
        )
        if self._resumed is not None:
            loader.load_state_dict(self._resumed)
        self._last_train_loader = loader
        return loader

    # Lightning saves and restores these with the checkpoint, as it does not the loader's (see resume.py).
    def state_dict(self) -> Dict[str, int]:
        """Where training is in the data and under which layout (checked when a run resumes)."""
        if self._last_train_loader is not None:
            return self._last_train_loader.state_dict()
        epoch, batches = self.train_position()
        return {"epoch": int(epoch), "batches": int(batches), **self._train_layout()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Keep a checkpoint's data state for the training loader (the one built already, when a
        strategy restores after its set-up, and those built later): it compares the layout when it
        starts the resumed epoch, once the loop's position is restored."""
        self._resumed = dict(state_dict) if state_dict else None
        if self._resumed is not None and self._last_train_loader is not None:
            self._last_train_loader.load_state_dict(self._resumed)

    def _loader_kwargs(self) -> dict:
        return dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=False,
            worker_timeout=self.worker_timeout,  # ssl_vit.data.stall.WatchedLoader
            worker_init_fn=IgnoreSignals(),  # the signals the main process answers (ssl_vit.data.workers)
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
        read_timeout: seconds a read from a shard behind a pipe or socket (``pipe:``, ``http(s)://``)
            may wait for data before the run stops naming the shard (default 300; 0 or None: no
            limit). See :mod:`ssl_vit.data.stall`.
        worker_timeout: seconds the main process waits for one batch from its DataLoader workers
            before the run stops naming the worker (default 600; 0 or None: no limit).
    """

    workers_matter = True  # each worker reads its own part of the shards

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
        read_timeout: Optional[float] = DEFAULT_READ_TIMEOUT_S,
        worker_timeout: Optional[float] = DEFAULT_WORKER_TIMEOUT_S,
    ) -> None:
        super().__init__(
            batch_size, num_workers, train_transform, val_transform, seed, max_corrupt_fraction, pin_memory, rank,
            world_size, worker_timeout,
        )
        self.read_timeout = check_timeout("read_timeout", read_timeout)
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
            read_timeout=self.read_timeout,
        )

    def train_dataloader(self) -> DataLoader:
        """``len()`` is the number of (full) batches per epoch on this rank, equal on every rank."""
        stream = self._stream("train", train=True)
        return self._train_loader(stream, stream.set_epoch)

    def val_dataloader(self) -> Union[DataLoader, List[DataLoader]]:
        """Every validation sample once (padded to equal counts per rank, see pipeline); [] without val."""
        if self.val is None:
            return []
        self.setup()
        return self._eval_loader("val")

    def _eval_loader(self, split: str, with_keys: bool = False) -> DataLoader:
        return WatchedLoader(self._stream(split, train=False, with_keys=with_keys), **self._loader_kwargs())
