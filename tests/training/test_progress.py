"""ProgressBar: the training bar moves on slow steps (time rule) without redrawing every fast one."""
import time

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ssl_vit.training import ProgressBar


class Tiny(pl.LightningModule):
    def __init__(self, step_s: float) -> None:
        super().__init__()
        self.w, self.step_s = torch.nn.Parameter(torch.zeros(1)), step_s

    def training_step(self, batch, batch_idx):
        time.sleep(self.step_s)
        return (self.w - batch[0].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)


class Seen(pl.Callback):
    """The bar's position after each batch (runs after the bar, which Lightning calls first)."""

    def __init__(self) -> None:
        self.n = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.n.append(trainer.progress_bar_callback.train_progress_bar.n)


def run(step_s: float, refresh_seconds: float) -> list:
    seen = Seen()
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[ProgressBar(refresh_rate=50, refresh_seconds=refresh_seconds), seen])
    trainer.fit(Tiny(step_s), train_dataloaders=DataLoader(TensorDataset(torch.randn(12, 2)), batch_size=2))
    return seen.n


def test_slow_steps_move_the_bar_by_time():
    assert run(step_s=0.06, refresh_seconds=0.05) == [1, 2, 3, 4, 5, 6]


def test_fast_steps_keep_the_batch_count_rule():
    n = run(step_s=0.0, refresh_seconds=60.0)
    assert n[:-1] == [0] * 5  # refresh_rate 50: no redraw before the end of the epoch
    assert n[-1] == 6


def test_bad_refresh_seconds_is_named():
    with pytest.raises(ValueError, match="refresh_seconds"):
        ProgressBar(refresh_seconds=0)
