"""Two CPU processes (gloo, ddp_spawn) must share one centre: the mean over both ranks' teacher outputs."""
import pytest
import pytorch_lightning as pl
import torch
from dist_helpers import Crops
from torch.utils.data import DataLoader

from ssl_vit.methods.dino import DINO

pytestmark = pytest.mark.slow  # processes, CLI training or end-to-end chains: `make test` only

TINY = dict(
    arch="vit_tiny_patch4_32", img_size=32, embed_dim=32, depth=1, num_heads=2, out_dim=32,
    head_hidden_dim=32, head_bottleneck_dim=8, drop_path_rate=0.0, warmup_epochs=0, lr=1e-3,
    momentum_teacher=0.9,
)
STEPS, PER_RANK = 2, 2  # optimiser steps, images per rank per step


def images(rank: int) -> torch.Tensor:
    """Rank-specific images; rank 1's are brighter, so the ranks' teacher means differ."""
    return torch.randn(STEPS * PER_RANK, 3, 32, 32, generator=torch.Generator().manual_seed(rank)) + 2.0 * rank


class PerRank(pl.LightningDataModule):
    """Each rank reads its own images (no distributed sampler)."""

    batch_size = PER_RANK

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Crops(images(self.trainer.global_rank)), batch_size=PER_RANK)


class Union(pl.LightningDataModule):
    """One process whose batch ``i`` holds rank 0's then rank 1's images of step ``i``."""

    batch_size = 2 * PER_RANK

    def train_dataloader(self) -> DataLoader:
        x0, x1 = images(0), images(1)
        steps = [torch.cat([x0[i * PER_RANK:(i + 1) * PER_RANK], x1[i * PER_RANK:(i + 1) * PER_RANK]]) for i in range(STEPS)]
        return DataLoader(Crops(torch.cat(steps)), batch_size=2 * PER_RANK)


class Rank0Only(pl.LightningDataModule):
    batch_size = PER_RANK

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Crops(images(0)), batch_size=PER_RANK)


class SaveCentre(pl.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: DINO) -> None:
        torch.save(pl_module.loss.center.clone(), f"{self.folder}/center_{trainer.global_rank}.pt")


def run(tmp_path, datamodule: pl.LightningDataModule, devices: int, name: str) -> None:
    folder = tmp_path / name
    folder.mkdir()
    torch.manual_seed(0)
    model = DINO(**TINY)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        max_epochs=1, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[SaveCentre(str(folder))],
    )
    trainer.fit(model, datamodule=datamodule)
    return folder


def test_two_ranks_share_the_all_reduced_centre(tmp_path):
    ddp = run(tmp_path, PerRank(), 2, "ddp")
    c0, c1 = torch.load(ddp / "center_0.pt"), torch.load(ddp / "center_1.pt")
    torch.testing.assert_close(c0, c1, rtol=0, atol=0)  # bit-identical on both ranks
    union = torch.load(run(tmp_path, Union(), 1, "union") / "center_0.pt")
    alone = torch.load(run(tmp_path, Rank0Only(), 1, "alone") / "center_0.pt")
    # the DDP centre is the centre of one process that saw both ranks' images...
    torch.testing.assert_close(c0, union, rtol=1e-4, atol=1e-5)
    # ... and not what rank 0 would have computed from its own images
    assert (c0 - alone).abs().max() > 100 * (c0 - union).abs().max() + 1e-4
