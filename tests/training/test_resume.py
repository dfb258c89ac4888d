"""Exact resume and atomic checkpoints.

A run of N + M optimiser steps straight is compared with the same run (schedules built for N + M)
stopped by an exception right after the step-N checkpoint and resumed from that checkpoint for the
remaining M steps: MAE and DINO, ShardDataModule with 0 and 2 workers, N mid-epoch and the epoch
change inside M. Negative controls show the comparison can fail: restarting the epoch at its start
(no data position), or not restoring the RNG states. Then: a crash inside a save never leaves only
a corrupt checkpoint (and a plain ModelCheckpoint does), keep-last-k, and ``--ckpt_path last``.
"""
import os
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from PIL import Image
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins import TorchCheckpointIO

from ssl_vit.checkpoints.io import safe_torch_load
from ssl_vit.cli import run_lightning
from ssl_vit.data import ImageFolderDataModule, PretrainTransform, ShardDataModule, write_shards
from ssl_vit.data.multicrop import MultiCropTransform
from ssl_vit.methods.dino import DINO
from ssl_vit.methods.mae import MAE
from ssl_vit.training import Checkpoint
from ssl_vit.training.checkpoint import RNG_KEY

pytestmark = pytest.mark.slow  # processes, CLI training or end-to-end chains: `make test` only

REPO = Path(__file__).resolve().parents[2]
BATCH, SAMPLES = 4, 24  # 6 batches per epoch with 0 or 2 workers
STOP, TOTAL = 3, 12     # stop after step 3 (mid-epoch 0; odd, so with 2 workers worker 1 is next), 2 epochs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against each other (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """24 random 32x32 JPEGs in 4 classes, as 3 shards of 8 (a reader's range crosses a shard)."""
    root = tmp_path_factory.mktemp("resume_data")
    rng = np.random.default_rng(0)
    for i in range(SAMPLES):
        folder = root / "src" / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg")
    write_shards(root / "src", root / "shards", "train", 8, progress=False)
    return str(root / "shards" / "train-{000000..000002}.tar")


def build(method: str):
    pl.seed_everything(0)
    tiny = dict(arch="vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2, warmup_epochs=1, lr=1e-3)
    if method == "mae":
        return MAE(img_size=32, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True,
                   drop_path_rate=0.1, **tiny)
    return DINO(img_size=32, drop_path_rate=0.1, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
                warmup_teacher_temp_epochs=1, teacher_temp=0.07, freeze_last_layer=1, momentum_teacher=0.9, **tiny)


def datamodule(method: str, shards: str, workers: int) -> ShardDataModule:
    transform = (PretrainTransform(size=32) if method == "mae"
                 else MultiCropTransform(global_size=32, local_size=16, num_local=2))
    return ShardDataModule(shards, batch_size=BATCH, num_workers=workers, train_transform=transform,
                           shuffle_buffer=5, pin_memory=False, seed=1)


class Stop(Callback):
    """A crash right after the step-``at`` checkpoint: at the start of the next step."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError(f"stop at step {self.at}")


def fit(method, shards, workers, root, ckpt_path=None, stop=None):
    """Train (2 epochs) and return ``(module state, optimiser state, trainer)``."""
    model, dm = build(method), datamodule(method, shards, workers)
    ckpt = Checkpoint(dirpath=str(root / "ckpt"), every_n_train_steps=1, keep_last=2)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(root),
        callbacks=[ckpt] + ([Stop(stop)] if stop else []),
    )
    if stop:
        with pytest.raises(RuntimeError, match="stop at step"):
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    else:
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, trainer.optimizers[0].state_dict() if not stop else None, trainer


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")


def max_difference(a, b) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


_straight: dict = {}


def straight(method, shards, workers, tmp_path_factory):
    """The uninterrupted run (computed once per configuration)."""
    if (method, workers) not in _straight:
        state, optim, trainer = fit(method, shards, workers, tmp_path_factory.mktemp("straight"))
        assert trainer.global_step == TOTAL
        _straight[method, workers] = state, optim
    return _straight[method, workers]


def interrupted(method, shards, workers, root, stop=STOP) -> str:
    """Run until the exception after step ``stop``; returns the step-``stop`` checkpoint."""
    _, _, trainer = fit(method, shards, workers, root, stop=stop)
    assert trainer.global_step == stop
    last = root / "ckpt" / "last.ckpt"
    assert safe_torch_load(last)["global_step"] == stop
    return str(last)


@pytest.mark.parametrize(
    "method, workers, stop",
    [("mae", 0, STOP), ("mae", 2, STOP), ("dino", 0, STOP), ("dino", 2, STOP),
     ("mae", 2, 6),   # the checkpoint of the epoch's last batch: the resumed run starts epoch 1
     ("dino", 2, 8)],  # stopped in epoch 1, an even number of batches in
)
def test_resume_continues_exactly(method, workers, stop, shards, tmp_path, tmp_path_factory):
    expected_state, expected_optim = straight(method, shards, workers, tmp_path_factory)
    last = interrupted(method, shards, workers, tmp_path, stop)
    checkpoint = safe_torch_load(last)  # weights-only loadable, with this rank's RNG states
    assert len(checkpoint[RNG_KEY]) == 1 and checkpoint["epoch"] == (stop - 1) // 6
    state, optim, trainer = fit(method, shards, workers, tmp_path, ckpt_path=last)
    assert trainer.global_step == TOTAL and trainer.current_epoch == 2
    assert_same(expected_state, state)  # student, EMA teacher, DINO centre, MAE encoder + decoder
    for a, b in zip(expected_optim["state"].values(), optim["state"].values()):
        assert_same(a, b)  # AdamW moments and step counts


@pytest.mark.parametrize("control", ["epoch restarted", "rng not restored"])
def test_resume_without_position_or_rng_differs(control, shards, tmp_path, tmp_path_factory, monkeypatch):
    """The comparison above fails when the data restarts at the epoch's first batch, or when the
    RNG states are not restored: it is sensitive to both."""
    expected_state, _ = straight("mae", shards, 0, tmp_path_factory)
    last = interrupted("mae", shards, 0, tmp_path)
    if control == "epoch restarted":
        monkeypatch.setattr(ShardDataModule, "train_position", lambda self: (self.current_epoch(), 0))
    else:
        monkeypatch.setattr(Checkpoint, "on_load_checkpoint", lambda *args: None)
    state, _, trainer = fit("mae", shards, 0, tmp_path, ckpt_path=last)
    assert trainer.global_step == TOTAL
    assert max_difference(expected_state, state) > 1e-4


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["shards", "folder"])
def test_epoch_started_part_way_yields_the_rest_of_the_epoch(kind, workers, shards, monkeypatch):
    """Data alone: an epoch started at batch k yields exactly batches k.. of the whole epoch, random
    augmentations included (seeded per sample, so independent of what ran before)."""
    folder = str(Path(shards).parents[1] / "src")
    common = dict(batch_size=BATCH, num_workers=workers, train_transform=PretrainTransform(size=16), seed=1,
                  pin_memory=False)
    module = (ShardDataModule(shards, shuffle_buffer=5, **common) if kind == "shards"
              else ImageFolderDataModule(folder, **common))
    position = [1, 0]
    monkeypatch.setattr(type(module), "train_position", lambda self: tuple(position))
    whole = [batch for batch in module.train_dataloader()]
    assert len(whole) == 6
    torch.manual_seed(123)  # the global RNG state does not matter
    for k in (1, 3, 5):
        position[1] = k
        rest = list(module.train_dataloader())
        assert len(rest) == 6 - k
        for (x, y), (x_ref, y_ref) in zip(rest, whole[k:]):
            assert torch.equal(y, y_ref) and torch.equal(x, x_ref)
    position[0] = 2  # another epoch: another order and other crops
    other = list(module.train_dataloader())
    assert not torch.equal(torch.cat([x for x, _ in other]), torch.cat([x for x, _ in whole]))


# -- atomic writes, keep-last-k, --ckpt_path last ---------------------------------------------------
class FailingIO(TorchCheckpointIO):
    """Writes the ``fail_at``-th checkpoint half-way, then raises (a crash or a full disk mid-write)."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.saves = fail_at, 0

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.saves += 1
        if self.saves < self.fail_at:
            return super().save_checkpoint(checkpoint, path, storage_options)
        super().save_checkpoint(checkpoint, path, storage_options)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError("disk full (simulated)")


def short_fit(shards, root, callback, plugins=(), max_steps=5, ckpt_path=None):
    model, dm = build("mae"), datamodule("mae", shards, 0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root), callbacks=[callback],
                         plugins=list(plugins))
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("kind", ["Checkpoint", "ModelCheckpoint"])
def test_crash_during_save_never_leaves_only_a_corrupt_checkpoint(kind, shards, tmp_path):
    folder = tmp_path / "ckpt"
    if kind == "Checkpoint":
        callback = Checkpoint(dirpath=str(folder), every_n_train_steps=1, keep_last=1)
    else:
        callback = ModelCheckpoint(dirpath=str(folder), every_n_train_steps=1, save_last=True,
                                   enable_version_counter=False)
    # saves: step-1 file, last.ckpt (step 1), step-2 file, last.ckpt (step 2) <- fails half-written
    with pytest.raises(OSError, match="disk full"):
        short_fit(shards, tmp_path, callback, plugins=[FailingIO(fail_at=4)])
    last = folder / "last.ckpt"
    if kind == "ModelCheckpoint":  # the control: Lightning's own writer leaves a truncated last.ckpt
        with pytest.raises(ValueError, match="truncated or damaged"):
            safe_torch_load(last)
        return
    assert safe_torch_load(last)["global_step"] == 1  # the previous last.ckpt, intact
    assert safe_torch_load(folder / "epoch=0-step=2.ckpt")["global_step"] == 2
    assert sorted(os.listdir(folder)) == ["epoch=0-step=2.ckpt", "last.ckpt"]  # no partial file left
    # a run killed hard during a save leaves its partial file: never taken for "last", removed at setup
    (folder / ".last.ckpt.partial").write_bytes(b"half a checkpoint")
    trainer = short_fit(shards, tmp_path, Checkpoint(dirpath=str(folder), every_n_train_steps=1, keep_last=1),
                        max_steps=3, ckpt_path="last")
    assert trainer.global_step == 3 and not (folder / ".last.ckpt.partial").exists()
    assert safe_torch_load(last)["global_step"] == 3


def test_keeps_the_last_k_and_last_ckpt(shards, tmp_path):
    folder = tmp_path / "ckpt"
    short_fit(shards, tmp_path, Checkpoint(dirpath=str(folder), every_n_train_steps=1, keep_last=2), max_steps=5)
    assert sorted(os.listdir(folder)) == ["epoch=0-step=4.ckpt", "epoch=0-step=5.ckpt", "last.ckpt"]
    steps = {name: safe_torch_load(folder / name)["global_step"] for name in os.listdir(folder)}
    assert steps == {"epoch=0-step=4.ckpt": 4, "epoch=0-step=5.ckpt": 5, "last.ckpt": 5}
    # resumed from last.ckpt (step 5), the same callback goes on: the older files are deleted in turn
    short_fit(shards, tmp_path, Checkpoint(dirpath=str(folder), every_n_train_steps=1, keep_last=2),
              max_steps=8, ckpt_path="last")
    assert sorted(os.listdir(folder)) == ["epoch=1-step=7.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"]
    with pytest.raises(ValueError, match="keep_last"):
        Checkpoint(keep_last=-2)
    with pytest.raises(ValueError, match="not a local path"):
        Checkpoint(dirpath="s3://bucket/run")


class ScriptedScore(Callback):
    """Logs a scripted ``score`` after each step (as a probe logs val/top1), for ranking checkpoints."""

    def __init__(self, scores) -> None:
        self.scores = list(scores)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.log("score", self.scores[trainer.global_step - 1], on_step=True, on_epoch=False, batch_size=1)


@pytest.mark.parametrize("mode,best", [("max", 2), ("min", 4)])
def test_with_a_monitor_it_keeps_the_best_and_last(mode, best, shards, tmp_path):
    """Probe/finetune recipes: the best checkpoint by a logged metric, plus last.ckpt to resume."""
    folder = tmp_path / "ckpt"
    callback = Checkpoint(dirpath=str(folder), every_n_train_steps=1, keep_last=1, monitor="score", mode=mode,
                          filename="{step}", auto_insert_metric_name=False)
    model, dm = build("mae"), datamodule("mae", shards, 0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[ScriptedScore([0.1, 0.9, 0.3, 0.05, 0.4]), callback])
    trainer.fit(model, datamodule=dm)
    assert sorted(os.listdir(folder)) == sorted([f"{best}.ckpt", "last.ckpt"])
    assert safe_torch_load(folder / f"{best}.ckpt")["global_step"] == best
    assert safe_torch_load(folder / "last.ckpt")["global_step"] == 5
    with pytest.raises(ValueError, match="mode"):
        Checkpoint(monitor="score", mode="best")


def test_cli_resumes_from_last(shards, tmp_path):
    """``ssl-vit fit --config recipes/smoke/mae.yaml ... --ckpt_path last`` goes on from the last step
    (the LightningCLI in this process: ``python -m ssl_vit`` itself is covered by tests/test_cli.py)."""
    folder = tmp_path / "ckpt"
    common = ["fit", "--config", str(REPO / "ssl_vit/recipes/smoke/mae.yaml"), "--data.train", shards,
              "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks+=ssl_vit.training.Checkpoint",
              f"--trainer.callbacks.dirpath={folder}", "--trainer.callbacks.every_n_train_steps=2"]
    first = run_lightning(common + ["--trainer.max_steps", "2"])
    assert first.trainer.global_step == 2 and safe_torch_load(folder / "last.ckpt")["global_step"] == 2
    second = run_lightning(common + ["--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert second.trainer.ckpt_path == str(folder / "last.ckpt")  # "last" resolved to our file
    assert second.trainer.global_step == 4 and safe_torch_load(folder / "last.ckpt")["global_step"] == 4
    assert sorted(os.listdir(folder)) == ["epoch=0-step=4.ckpt", "last.ckpt"]


PRETRAINING_RECIPES = sorted(
    str(p.relative_to(REPO)) for d in ("mae", "dino") for p in (REPO / "ssl_vit" / "recipes" / d).glob("*.yaml")
)


@pytest.mark.parametrize("recipe", PRETRAINING_RECIPES)
def test_pretraining_recipes_checkpoint_with_the_resumable_callback(recipe):
    callbacks = yaml.safe_load((REPO / recipe).read_text())["trainer"].get("callbacks", [])
    assert not any(c["class_path"].endswith("ModelCheckpoint") for c in callbacks)
    built = [Checkpoint(**c["init_args"]) for c in callbacks if c["class_path"] == "ssl_vit.training.Checkpoint"]
    resume = [c for c in built if c.save_last]
    assert len(resume) == 1 and resume[0]._every_n_train_steps > 0 and resume[0].keep_last >= 1


class FirstBatch(Callback):
    """Records the epoch, the batch index and the progress bar's text at the first batch of a fit."""
    def __init__(self):
        self.seen = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seen is None:
            bar = trainer.progress_bar_callback.train_progress_bar
            self.seen = (trainer.current_epoch, batch_idx, bar.desc, bar.n, bar.total)


def test_a_run_stopped_by_max_steps_resumes_mid_epoch(shards, tmp_path):
    """Lightning runs the epoch-end hooks when max_steps stops it mid-epoch, with the epoch counted as
    done: a last.ckpt written there resumed at the start of epoch 1 (the rest of epoch 0 never read,
    the bar saying "Epoch 1"). Checkpoint saves the last step as the mid-epoch state instead."""
    from ssl_vit.training import ProgressBar

    folder = tmp_path / "ckpt"

    def fit(max_steps, ckpt_path=None):
        first = FirstBatch()
        model, dm = build("mae"), datamodule("mae", shards, 0)
        trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_model_summary=False,
                             default_root_dir=str(tmp_path), callbacks=[
                                 Checkpoint(dirpath=str(folder), every_n_train_steps=100), first,
                                 ProgressBar(refresh_rate=1)])
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return first.seen

    fit(STOP)  # 3 of the epoch's 6 batches
    saved = safe_torch_load(folder / "last.ckpt")
    assert saved["global_step"] == STOP and saved["epoch"] == 0
    epoch, batch_idx, desc, n, total = fit(STOP + 2, ckpt_path="last")
    assert (epoch, batch_idx) == (0, STOP)  # the rest of epoch 0, not the start of epoch 1
    assert desc.startswith("Epoch 0") and n == STOP and total == STOP + 2
