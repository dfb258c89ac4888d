"""Two CPU processes (gloo, ddp_spawn), a NaN batch on rank 1 only: both ranks must take the same
decision (the flag is a max over processes), skip the step, and stay bit-identical.

Run under fp16 AMP (a GradScaler, on CPU here), where only the loss is checked: rank 0's loss is
finite, so without the max over processes rank 0 would keep the NaN centre (a mean over both ranks)."""
import pytest
import pytorch_lightning as pl
import torch
from dist_helpers import Crops  # 2 global crops and 1 local crop of each image
from pytorch_lightning.plugins import MixedPrecision
from torch.utils.data import DataLoader

from ssl_vit.methods.dino import DINO
from ssl_vit.training import NonFiniteGuard

pytestmark = pytest.mark.slow  # processes, CLI training or end-to-end chains: `make test` only

TINY = dict(
    arch="vit_tiny_patch4_32", img_size=32, embed_dim=32, depth=1, num_heads=2, out_dim=32,
    head_hidden_dim=32, head_bottleneck_dim=8, drop_path_rate=0.0, warmup_epochs=0, lr=1e-3,
    momentum_teacher=0.9, freeze_last_layer=0,
)
STEPS, PER_RANK, BAD_STEP = 3, 2, 1


def images(rank: int) -> torch.Tensor:
    """Rank-specific random images; rank 1's batch of step ``BAD_STEP`` is NaN."""
    x = torch.randn(STEPS * PER_RANK, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    if rank == 1:
        x[BAD_STEP * PER_RANK:(BAD_STEP + 1) * PER_RANK] = float("nan")
    return x


class PerRank(pl.LightningDataModule):
    batch_size = PER_RANK

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Crops(images(self.trainer.global_rank)), batch_size=PER_RANK)


class Save(pl.Callback):
    """Each rank saves its state before and after the bad step, and at the end."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def save(self, trainer: pl.Trainer, module: DINO, tag: str) -> None:
        state = {k: v.clone() for k, v in module.state_dict().items()}
        guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
        state["skipped"] = guard.skipped.clone()
        torch.save(state, f"{self.folder}/{tag}_{trainer.global_rank}.pt")

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == BAD_STEP:
            self.save(trainer, module, "before")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == BAD_STEP + 1:
            self.save(trainer, module, "after")
        if trainer.global_step == STEPS:
            self.save(trainer, module, "end")


def test_a_nan_on_one_rank_is_skipped_on_both(tmp_path):
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=STEPS, use_distributed_sampler=False,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[NonFiniteGuard(check_every=1), Save(str(tmp_path))],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))],
    )
    trainer.fit(DINO(**TINY), datamodule=PerRank())
    load = lambda tag, rank: torch.load(tmp_path / f"{tag}_{rank}.pt", weights_only=True)
    for rank in (0, 1):
        before, after, end = load("before", rank), load("after", rank), load("end", rank)
        for key, value in before.items():
            if key != "skipped":
                assert torch.equal(value, after[key]), (rank, key)  # student, teacher, centre held
        assert int(after["skipped"]) == 1 and int(end["skipped"]) == 1
        assert all(bool(torch.isfinite(v).all()) for v in end.values() if v.is_floating_point())
        assert not torch.equal(end["loss.center"], after["loss.center"])  # then training goes on
        assert not torch.equal(end["teacher.head.mlp.0.weight"], after["teacher.head.mlp.0.weight"])
    end0, end1 = load("end", 0), load("end", 1)
    for key, value in end0.items():
        assert torch.equal(value, end1[key]), key  # the ranks never diverged
