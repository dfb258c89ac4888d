"""Evaluation across processes: which part of a loader a rank reads, and gathering rows of unequal
length from every rank. The collective is passed in (``LightningModule.all_gather``), so this module
needs no process group of its own."""
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.distributed import DistributedSampler


def split_for_rank(dataloader: Any, rank: int, world_size: int) -> Any:
    """The part of ``dataloader`` this rank reads when Lightning does not inject a sampler.

    Iterable datasets (webdataset shards) split by rank themselves and are returned as they are, as
    are loaders with a ``DistributedSampler``; other map-style loaders are rebuilt reading indices
    ``rank, rank + world_size, ...`` (no padding, so no sample is counted twice).
    """
    if world_size == 1 or not isinstance(dataloader, DataLoader):
        return dataloader
    if isinstance(dataloader.dataset, IterableDataset) or isinstance(dataloader.sampler, DistributedSampler):
        return dataloader
    indices = list(range(rank, len(dataloader.dataset), world_size))
    return DataLoader(
        dataloader.dataset,
        batch_size=dataloader.batch_size,
        sampler=indices,
        num_workers=dataloader.num_workers,
        collate_fn=dataloader.collate_fn,
        pin_memory=dataloader.pin_memory,
    )


def gather_rows(x: Tensor, all_gather: Callable[[Tensor], Tensor], world_size: int, device: torch.device, chunk: int = 65536) -> Tensor:
    """Concatenate ``x [n_r, ...]`` of every rank (sizes may differ) on every rank, on ``x``'s device.

    Args:
        x: this rank's rows.
        all_gather: ``LightningModule.all_gather`` (stacks ``[world_size, ...]``).
        world_size: number of processes.
        device: the accelerator the collective runs on; rows travel there in chunks of ``chunk``
            rows, so a CPU bank is never on the accelerator all at once.
    """
    if world_size == 1:
        return x
    sizes = all_gather(torch.tensor([x.shape[0]], device=device)).view(-1).tolist()
    longest = max(sizes)
    padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    pieces = []
    for start in range(0, longest, chunk):
        pieces.append(all_gather(padded[start : start + chunk].to(device)).to(x.device))  # [W, c, ...]
    stacked = torch.cat(pieces, dim=1)  # [W, longest, ...]
    return torch.cat([stacked[r, : sizes[r]] for r in range(world_size)])
