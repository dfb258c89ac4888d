"""Resuming mid-epoch under another data layout (batch size, worker count, data seed) is reported,
naming each changed setting with its old and new value: the position saved with the checkpoint (the
DataModule's state) reaches the training loader, which compares layouts when it starts the resumed
epoch. It used to be compared only in the loader's ``load_state_dict``, which Lightning never calls."""
import logging
from pathlib import Path
from typing import List

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ssl_vit.data import EvalTransform, ShardDataModule, write_shards

STOP = 3  # the checkpoint: after batch 3 of epoch 0 (of 8 batches of 2)


class Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3 * 8 * 8, 16)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self.net(images.flatten(1)), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SaveAt(pl.Callback):
    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.fixture
def checkpoint(tmp_path, make_folder) -> tuple:
    """16 samples in 4 shards; the checkpoint of a run at batch STOP of epoch 0 (batch size 2)."""
    root = tmp_path
    make_folder(root / "src", [1] * 16)
    write_shards(root / "src", root / "shards", "train", 4, progress=False)
    pattern = str(root / "shards" / "train-{000000..000003}.tar")
    path = root / "mid_epoch.ckpt"
    fit(datamodule(pattern), max_steps=STOP, callbacks=[SaveAt(STOP, path)])
    return pattern, path


def datamodule(pattern: str, **changes) -> ShardDataModule:
    options = dict(batch_size=2, num_workers=0, seed=0, train_transform=EvalTransform(8, crop_pct=1.0),
                   shuffle_buffer=0, pin_memory=False)
    return ShardDataModule(pattern, **{**options, **changes})


def fit(dm: ShardDataModule, max_steps: int, callbacks: List[pl.Callback] = (), ckpt_path=None) -> None:
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(Linear(), datamodule=dm, ckpt_path=ckpt_path)


def resume_warnings(checkpoint: tuple, caplog, **changes) -> List[str]:
    pattern, path = checkpoint
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data.resume"):
        fit(datamodule(pattern, **changes), max_steps=STOP + 2, ckpt_path=str(path))
    return [r.getMessage() for r in caplog.records if r.name == "ssl_vit.data.resume"]


def test_the_same_layout_resumes_without_a_warning(checkpoint, caplog):
    assert resume_warnings(checkpoint, caplog) == []


@pytest.mark.parametrize("changes, named", [
    (dict(batch_size=4), "batch_size 2 -> 4"),
    (dict(seed=1), "seed 0 -> 1"),
    (dict(num_workers=2), "num_workers 0 -> 2"),
])
def test_a_changed_layout_is_named_with_its_old_and_new_value(checkpoint, caplog, changes, named):
    (warning,) = resume_warnings(checkpoint, caplog, **changes)
    assert warning.startswith(f"resuming from batch {STOP} of epoch 0 with a different data layout than the "
                              f"checkpoint's ({named}): the rest of that epoch is read as if the {STOP} batches")


def test_a_position_the_new_layout_cannot_hold_is_reported_with_where_training_goes_on(checkpoint, caplog):
    """Batch size 8: 2 batches per epoch, fewer than the 3 trained; Lightning restarts the epoch."""
    (warning,) = resume_warnings(checkpoint, caplog, batch_size=8)
    assert "(batch_size 2 -> 8): under the new layout an epoch has 2 batches, and training goes on from batch 0 of " \
           "epoch 0: the rest of the interrupted epoch is not read as it was laid out" in warning
