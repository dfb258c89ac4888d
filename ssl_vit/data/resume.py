"""Training data that a resumed run continues exactly: epochs that start part-way, and augmentation
randomness that depends on the sample's place in the epoch rather than on RNG history.

**Where an epoch starts.** :class:`ResumableLoader` does not start its DataLoader iterator when
``iter()`` is called but at the first ``next()``. Lightning creates the first epoch's iterator early
(``trainer.estimated_stepping_batches`` in ``configure_optimizers`` loads the data before the
checkpoint's loop state is restored) and, on a mid-epoch restart, keeps that iterator for the resumed
epoch. At the first ``next()`` the loop state is restored, so the loader asks its ``position_fn`` for
``(epoch, batches)``: the epoch to read and how many of its batches the training loop has already
consumed (``trainer.fit_loop.epoch_loop.batch_progress.current.ready``; 0 for a fresh epoch). That
count is what Lightning itself assumes was skipped (its fetcher adds it to the batches fetched), so
the two cannot disagree, and it counts what the loop consumed, not what the DataLoader's workers
prefetched. ``start_fn(epoch, batches)`` then positions the dataset or sampler.

The loader draws its workers' base seed from its own generator (seeded by ``seed`` and the epoch),
so starting an epoch takes nothing from the global torch RNG that the model's randomness (MAE
masks, drop path) uses: a resumed run's first ``iter()`` would otherwise shift it.

**Per-sample augmentation seeds.** :func:`call_seeded` runs a transform with the torch (CPU),
``random`` and NumPy global RNGs seeded from :func:`sample_seed` of the sample's coordinates, so an
augmentation depends only on ``(seed, epoch, reader, position)``, not on which worker ran it or on
what ran before. In a DataLoader worker the RNGs are simply re-seeded; in the main process
(``num_workers=0``) their states are saved and restored around the call so that the training RNG
stream is untouched. Cost per sample, measured on a 2-core machine under load (load average ~7):
~25 us in a worker, ~300 us in the main process (NumPy's state save and restore dominate), against
~670 us for ``PretrainTransform(32)`` on a 32x32 image and ~4.5 ms for ``PretrainTransform(224)``
on a 500x375 one (so ~0.5% at ImageNet sizes in workers).
"""
import hashlib
import logging
import random
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, get_worker_info

from ssl_vit.data.stall import WatchedLoader, worker_stall_error

logger = logging.getLogger(__name__)


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integer coordinates (stable across processes and Python runs)."""
    digest = hashlib.blake2b("/".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def call_seeded(fn: Callable[[Any], Any], x: Any, seed: int) -> Any:
    """``fn(x)`` with the torch CPU, ``random`` and NumPy global RNGs seeded by ``seed``.

    Outside DataLoader workers the three states are restored afterwards (the CUDA RNG is never
    touched: only ``torch.default_generator`` is seeded).
    """
    restore = get_worker_info() is None
    if restore:
        states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    try:
        return fn(x)
    finally:
        if restore:
            torch.set_rng_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by ``seed + epoch``, also for one replica) whose next pass
    starts ``skip`` indices in; ``len()`` stays the whole epoch's, as Lightning expects."""

    skip: int = 0

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        indices = super().__iter__()
        for _ in range(skip):
            next(indices, None)
        return indices


class _Deferred:
    """The iterator :class:`ResumableLoader` returns: starts the real one at the first ``next()``."""

    def __init__(self, loader: "ResumableLoader") -> None:
        self.loader = loader
        self.iterator: Optional[Iterator] = None
        self.batches = 0  # handed out since the iterator started

    def __iter__(self) -> "_Deferred":
        return self

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = self.loader._start()
        try:
            batch = next(self.iterator)
        except RuntimeError as exc:  # torch's worker timeout says neither which worker nor which option
            stalled = worker_stall_error(exc, self.batches, self.loader.num_workers)
            if stalled is None:
                raise
            raise stalled from exc
        except (ConnectionError, EOFError) as exc:
            # A worker killed (out-of-memory killer...) after sending a batch but before the main
            # process fetched its shared-memory descriptor surfaces here, not as torch's
            # "DataLoader worker ... exited unexpectedly".
            raise RuntimeError(
                f"a DataLoader worker died while handing over a batch (killed? out of memory?): {exc!r}"
            ) from exc
        self.batches += 1
        return batch

    def __len__(self) -> int:
        return len(self.loader)


class ResumableLoader(WatchedLoader):
    """A training DataLoader whose epoch starts where the training loop is (see the module docstring).

    Args:
        dataset: the dataset (its sampler, if any, in ``kwargs``).
        position_fn: ``() -> (epoch, batches already consumed in it)``, asked when an epoch starts.
        start_fn: ``(epoch, skip_batches) -> None``: positions the dataset / sampler; runs before the
            workers start, so what it sets reaches them.
        layout: the settings a mid-epoch position depends on (batch size, workers, ranks, seed);
            compared on resume with the checkpoint's (the DataModule's ``state_dict``, handed over with
            :meth:`load_state_dict`): a mismatch is logged, naming each changed setting with its old
            and new value (the skipped batches are then not exactly the trained ones).
        seed: seeds the loader's own generator (with the epoch).
        **kwargs: ``DataLoader`` arguments.
    """

    def __init__(
        self,
        dataset: Any,
        position_fn: Callable[[], Tuple[int, int]],
        start_fn: Callable[[int, int], None],
        layout: Dict[str, int],
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.position_fn, self.start_fn, self.layout, self.seed = position_fn, start_fn, dict(layout), seed
        self._loaded: Optional[Dict[str, int]] = None

    def __iter__(self) -> Iterator:  # type: ignore[override]
        return _Deferred(self)

    def _start(self) -> Iterator:
        epoch, batches = (int(v) for v in self.position_fn())
        if not 0 <= batches <= len(self):
            raise RuntimeError(f"cannot start epoch {epoch} at batch {batches}: it has {len(self)} batches")
        loaded, self._loaded = self._loaded, None
        if loaded is not None and 0 < loaded.get("batches", 0) < loaded.get("epoch_batches", float("inf")):
            self._check_layout(loaded, epoch, batches)  # the first epoch started after a mid-epoch checkpoint
        self.generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch))
        self.start_fn(epoch, batches)
        return super().__iter__()

    def _check_layout(self, loaded: Dict[str, int], epoch: int, batches: int) -> None:
        """Warn when the checkpoint ``loaded`` was taken mid-epoch under another layout, naming each
        changed setting with its old and new value."""
        changed = [f"{k} {loaded[k]} -> {v}" for k, v in self.layout.items() if k in loaded and loaded[k] != v]
        if not changed:
            return
        at = f"batch {loaded['batches']} of epoch {loaded.get('epoch')}"
        if (loaded.get("epoch"), loaded["batches"]) == (epoch, batches):
            effect = (f"the rest of that epoch is read as if the {batches} batches already trained had been made "
                      "under the new layout: some of its samples are read twice and others not at all")
        else:  # the trained batches are as many as, or more than, an epoch now has
            effect = (f"under the new layout an epoch has {len(self)} batches, and training goes on from batch "
                      f"{batches} of epoch {epoch}: the rest of the interrupted epoch is not read as it was laid out")
        logger.warning(
            "resuming from %s with a different data layout than the checkpoint's (%s): %s (from the next epoch "
            "on, every sample is read again)", at, ", ".join(changed), effect,
        )

    # Lightning saves these with the fit loop (and then does not warn that the loader is not resumable), but
    # never calls load_state_dict: it builds the loader before the checkpoint is restored (see the module
    # docstring) and restores loader states only into a loader built after. The DataModules therefore save
    # the same state themselves (Lightning restores a DataModule's state before building the loaders).
    def state_dict(self) -> Dict[str, int]:
        epoch, batches = self.position_fn()
        return {"epoch": int(epoch), "batches": int(batches), "epoch_batches": len(self), **self.layout}

    def load_state_dict(self, state_dict: Dict[str, int]) -> None:
        """Keeps the saved layout for the check at the next epoch start (the position itself comes
        from the restored loop, see the module docstring)."""
        self._loaded = dict(state_dict)
