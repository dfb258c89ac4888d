"""The guard sees a non-finite *update*: the loss and the gradients are finite, but the optimiser step
makes a weight NaN. Such a run used to exit 0 with non-finite weights, and with checkpoints its error
said "The weights are finite" and advised resuming from a checkpoint full of NaNs. Now the weights are
checked at every check step, at the end of training and before every checkpoint save (none of
non-finite weights is written), and a checkpoint is named for resuming only once read back finite."""
import os
from pathlib import Path
from typing import Sequence

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ssl_vit.checkpoints.io import count_non_finite, safe_torch_load
from ssl_vit.methods.mae import MAE
from ssl_vit.training import Checkpoint
from ssl_vit.training.nonfinite import NonFiniteError, NonFiniteGuard, resume_advice

TINY = dict(arch=None, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2, lr=1e-3, warmup_epochs=0)


class Data(pl.LightningDataModule):
    batch_size = 2

    def __init__(self, steps: int) -> None:
        super().__init__()
        images = torch.randn(2 * steps, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        self.dataset = TensorDataset(images, torch.zeros(2 * steps, dtype=torch.long))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=2)


class PoisonUpdate(pl.Callback):
    """After the optimiser step of the given global steps, one weight is NaN: what an update with
    finite inputs does when it overflows (the guard has already decided the step was good)."""

    def __init__(self, steps: Sequence[int]) -> None:
        self.steps = set(steps)

    def on_train_start(self, trainer, module) -> None:
        def poison(optimizer, args, kwargs) -> None:
            if trainer.global_step in self.steps:
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")

        trainer.optimizers[0].register_step_post_hook(poison)


def fit(steps: int, poison: Sequence[int], guard: NonFiniteGuard, callbacks=(), **kwargs) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         max_steps=steps, callbacks=[guard, PoisonUpdate(poison), *callbacks], **kwargs)
    trainer.fit(MAE(**TINY), datamodule=Data(steps))
    return trainer


def test_an_update_that_makes_the_weights_nan_stops_the_run_at_the_end_of_training():
    # the last step's update: no later loss sees it; the old guard let this 4-step run exit 0
    with pytest.raises(NonFiniteError, match=r"the weights became non-finite between global steps 0 and 4, with every "
                                             r"loss and gradient norm finite.*There is no checkpoint yet"):
        fit(4, poison=[3], guard=NonFiniteGuard(check_every=100), enable_checkpointing=False)


def test_at_a_check_step_after_the_losses_turned_nan():
    with pytest.raises(NonFiniteError, match=r"between global steps 0 and 3, after 1 skipped step\(s\) \(the first at "
                                             r"global step 2\)") as info:
        fit(6, poison=[1], guard=NonFiniteGuard(check_every=3), enable_checkpointing=False)
    assert "The weights are finite" not in str(info.value)


def test_no_checkpoint_of_non_finite_weights_is_written_and_the_error_names_a_checked_one(tmp_path):
    folder = tmp_path / "ckpt"
    checkpoints = Checkpoint(dirpath=str(folder), every_n_train_steps=1, keep_last=2)
    with pytest.raises(NonFiniteError, match="not saving the checkpoint of global step 3: the weights are non-finite") as info:
        fit(5, poison=[2], guard=NonFiniteGuard(check_every=100), callbacks=[checkpoints])
    last = folder / "last.ckpt"
    assert f"Resume from {last} (read back: its weights and optimiser state are finite)" in str(info.value)
    assert safe_torch_load(last)["global_step"] == 2
    assert all(count_non_finite(safe_torch_load(f)) == 0 for f in folder.glob("*.ckpt"))


def test_the_advice_passes_over_checkpoints_that_hold_non_finite_tensors(tmp_path):
    good, bad, broken = tmp_path / "good.ckpt", tmp_path / "bad.ckpt", tmp_path / "broken.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    torch.save({"state_dict": {"w": torch.tensor([1.0, float("nan")]), "b": torch.full((1,), float("inf")),
                               "n": torch.arange(3)}, "optimizer_states": [{"m": torch.tensor(float("nan"))}]}, bad)
    broken.write_bytes(b"")
    advice = resume_advice([str(broken), str(bad), str(good)])
    assert f"Do not resume from {broken}: it cannot be read back" in advice
    assert f"Do not resume from {bad}: it holds 3 non-finite tensor(s)." in advice
    assert advice.endswith(f"Resume from {good} (read back: its weights and optimiser state are finite).")
    assert resume_advice([str(bad)]).endswith("No checkpoint of this run holds finite weights: start again.")


def test_a_stop_error_does_not_recommend_a_checkpoint_it_has_not_read_back(tmp_path):
    """A NaN batch under policy 'stop' with a last.ckpt that holds NaNs (written by a run without the
    guard): the old message called it the last checkpoint and advised resuming from it."""
    folder = tmp_path / "ckpt"
    poisoned = {"state_dict": {"w": torch.full((2,), float("nan"))}}

    class Overwrite(pl.Callback):  # the last.ckpt of the step before is replaced by NaNs
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if (folder / "last.ckpt").exists():
                torch.save(poisoned, folder / "last.ckpt")
                os.utime(folder / "last.ckpt")

    class NaNBatch(Data):
        def train_dataloader(self) -> DataLoader:
            self.dataset.tensors[0][2:4] = float("nan")  # the batch of global step 1
            return super().train_dataloader()

    torch.manual_seed(0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         max_steps=4, callbacks=[NonFiniteGuard("stop", check_every=2),
                                                 Checkpoint(dirpath=str(folder), every_n_train_steps=1, keep_last=2),
                                                 Overwrite()])
    with pytest.raises(NonFiniteError, match=r"global step 1 .*policy='stop'") as info:
        trainer.fit(MAE(**TINY), datamodule=NaNBatch(4))
    message = str(info.value)
    assert f"Do not resume from {folder / 'last.ckpt'}: it holds 1 non-finite tensor(s)" in message
    kept = Path(message.split("Resume from ")[1].split(" (read back")[0])
    assert kept.parent == folder and kept.name != "last.ckpt" and count_non_finite(safe_torch_load(kept)) == 0
