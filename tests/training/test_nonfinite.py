"""The non-finite guard: a NaN/inf loss or gradient skips the step on the device (student, EMA
teacher, MAE decoder, DINO centre, BatchNorm statistics, optimiser state all as before), is counted,
stops the run when asked, adds no per-step host sync, and leaves the normal path unchanged."""
import inspect
import os
from typing import Dict, List, Optional, Sequence

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins import MixedPrecision
from torch.utils.data import DataLoader, Dataset

import ssl_vit
from ssl_vit.checkpoints.io import safe_torch_load
from ssl_vit.methods.dino import DINO
from ssl_vit.methods.mae import MAE
from ssl_vit.methods.probe import LinearProbe
from ssl_vit.training.nonfinite import NonFiniteError, NonFiniteGuard

# the package's own files, by their real location (a checkout may itself be named ssl_vit, and hold
# a .venv with Lightning inside it)
PACKAGE_DIR = os.path.dirname(ssl_vit.__file__) + os.sep

MAE_TINY = dict(
    arch=None, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
    decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, lr=1e-3, warmup_epochs=0,
)
DINO_TINY = dict(
    arch="vit_tiny_patch4_32", img_size=32, embed_dim=32, depth=1, num_heads=2, out_dim=32,
    head_hidden_dim=32, head_bottleneck_dim=8, drop_path_rate=0.0, warmup_epochs=0, lr=1e-3,
    momentum_teacher=0.9, freeze_last_layer=0,
)
BATCH = 2


class Images(Dataset):
    """Random 32x32 images; every image of the batches in ``bad`` is NaN. ``views``: DINO crops."""

    def __init__(self, n: int, bad: Sequence[int] = (), views: bool = False) -> None:
        self.x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        self.bad, self.views = set(bad), views

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i]
        if i // BATCH in self.bad:
            x = torch.full_like(x, float("nan"))
        if self.views:
            return [x, x.flip(-1), x[:, :16, :16]], -1
        return x, -1


class Data(pl.LightningDataModule):
    batch_size = BATCH

    def __init__(self, steps: int, bad: Sequence[int] = (), views: bool = False) -> None:
        super().__init__()
        self.dataset = Images(steps * BATCH, bad, views)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=BATCH)


def trainer(guard: Optional[NonFiniteGuard] = None, before_guard: Sequence[pl.Callback] = (), **kwargs) -> pl.Trainer:
    """A CPU trainer with the guard (default settings unless given) first among its callbacks, after
    ``before_guard`` (callbacks that must act on gradients before the guard reads them)."""
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, max_epochs=1,
    )
    callbacks = [*before_guard, guard or NonFiniteGuard(), *kwargs.pop("callbacks", [])]
    return pl.Trainer(**{**defaults, **kwargs, "callbacks": callbacks})


def guard_of(model: pl.LightningModule) -> NonFiniteGuard:
    return next(c for c in model.trainer.callbacks if isinstance(c, NonFiniteGuard))


def mae(**kwargs) -> MAE:
    torch.manual_seed(0)
    return MAE(**{**MAE_TINY, **kwargs})


def dino(**kwargs) -> DINO:
    torch.manual_seed(0)
    return DINO(**{**DINO_TINY, **kwargs})


def full_state(module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> Dict[str, torch.Tensor]:
    """Every floating tensor of the training state: parameters and buffers (teacher, decoder,
    centre, BatchNorm statistics) and the optimiser state (moments, step counters)."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}
    names = {id(p): n for n, p in module.named_parameters()}
    for p, s in optimizer.state.items():
        for key, value in s.items():
            if torch.is_tensor(value):
                state[f"opt.{names[id(p)]}.{key}"] = value.detach().clone()
    return state


class Record(pl.Callback):
    """The full state before and after every optimiser step (the hooks run once per step here)."""

    def __init__(self) -> None:
        self.before: List[Dict[str, torch.Tensor]] = []
        self.after: List[Dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before.append(full_state(module, trainer.optimizers[0]))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.after.append(full_state(module, trainer.optimizers[0]))


def same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> List[str]:
    """Keys whose tensors differ (new optimiser state in ``b`` counts as a difference)."""
    return [k for k in b if k not in a or not torch.equal(a[k], b[k])]


def all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())


def trainer_ok(model: pl.LightningModule, steps: int) -> bool:
    """The run did all its steps and every weight and buffer is finite."""
    return model.trainer.global_step == steps and all_finite(model)


# -- skip ------------------------------------------------------------------------------------------
def test_mae_skips_a_nan_batch_encoder_decoder_and_optimiser_state_as_before():
    model, record = mae(), Record()
    trainer(max_steps=4, callbacks=[record]).fit(model, datamodule=Data(4, bad=[1]))
    assert trainer_ok(model, steps=4)
    changed = [same(b, a) for b, a in zip(record.before, record.after)]
    assert changed[1] == []  # the poisoned step: nothing moved, step counters included
    assert any(k.startswith("decoder.") for k in changed[2]) and any(k.startswith("encoder.vit.") for k in changed[2])
    assert changed[0] and changed[3]  # the other steps train
    assert int(guard_of(model).skipped) == 1 and int(guard_of(model).first_bad) == 1
    opt_steps = {float(v) for k, v in record.after[-1].items() if k.endswith(".step")}
    assert opt_steps == {3.0}  # 4 steps, 1 skipped: AdamW's bias correction is not advanced by the skip



def test_dino_skips_a_nan_batch_student_teacher_centre_and_batchnorm_as_before():
    model, record = dino(head_use_bn=True), Record()
    trainer(max_steps=4, callbacks=[record]).fit(model, datamodule=Data(4, bad=[2], views=True))
    assert trainer_ok(model, steps=4)
    changed = [same(b, a) for b, a in zip(record.before, record.after)]
    assert changed[2] == []
    moved = changed[3]
    prefixes = ("student.backbone.", "teacher.backbone.", "teacher.head.", "loss.center", "student.head.mlp.1.running_mean")
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in moved), prefix  # ...which the step after does move
    assert int(guard_of(model).skipped) == 1


def test_without_the_guard_the_nan_batch_would_poison_dino(monkeypatch):
    """The control: with the decision forced to "good", the same run ends with NaN weights (which the
    guard's end-of-training weight check then reports)."""
    original = NonFiniteGuard.flag

    def never_bad(self, grads, step, reduce=lambda t: t):
        bad, norm = original(self, grads, step, reduce)
        bad.zero_()
        return bad, norm

    monkeypatch.setattr(NonFiniteGuard, "flag", never_bad)
    model = dino()
    with pytest.raises(NonFiniteError, match="the weights became non-finite"):
        trainer(max_steps=3).fit(model, datamodule=Data(3, bad=[1], views=True))
    assert not bool(torch.isfinite(model.loss.center).all())
    assert not all(bool(torch.isfinite(p).all()) for p in model.teacher.parameters())


class PoisonGradient(pl.Callback):
    """Makes one gradient inf at the given steps (given before the guard, whose
    ``on_before_optimizer_step`` then sees it)."""

    def __init__(self, steps: Sequence[int]) -> None:
        self.steps = set(steps)

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if trainer.global_step in self.steps:
            next(p for p in module.parameters() if p.grad is not None).grad[0] = float("inf")


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped_counted_and_logged():
    model, record = mae(), Record()
    trainer(max_steps=3, before_guard=[PoisonGradient([1])], callbacks=[record]).fit(model, datamodule=Data(3))
    assert trainer_ok(model, steps=3)
    assert same(record.before[1], record.after[1]) == []
    metrics = model.trainer.callback_metrics
    assert metrics["train/skipped_steps"] == 1 and torch.isfinite(metrics["train/grad_norm"])


# -- stop and max_skipped_steps --------------------------------------------------------------------
def test_stop_raises_at_the_next_check_naming_the_step_and_the_last_checkpoint(tmp_path):
    model = mae()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    trainer_ = trainer(NonFiniteGuard("stop", check_every=2), max_steps=6, enable_checkpointing=True, callbacks=[checkpoints])
    with pytest.raises(NonFiniteError, match=r"global step 1 .*policy='stop'.*last\.ckpt"):
        trainer_.fit(model, datamodule=Data(6, bad=[1]))
    assert trainer_.global_step == 2  # checked after 2 steps, as asked: no per-step sync
    assert all_finite(model)
    last = safe_torch_load(tmp_path / "last.ckpt")["state_dict"]
    assert all(bool(torch.isfinite(v).all()) for v in last.values() if v.is_floating_point())


def test_stop_without_checkpoints_says_so_and_the_end_of_training_is_a_check():
    model = mae()
    with pytest.raises(NonFiniteError, match="global step 2 .*no checkpoint yet"):
        trainer(NonFiniteGuard("stop", check_every=100), max_steps=3).fit(model, datamodule=Data(3, bad=[2]))


def test_max_skipped_steps():
    model = mae()
    trainer(NonFiniteGuard(max_skipped_steps=2, check_every=1), max_steps=5).fit(model, datamodule=Data(5, bad=[0, 3]))
    assert trainer_ok(model, steps=5) and int(guard_of(model).skipped) == 2
    model = mae()
    trainer_ = trainer(NonFiniteGuard(max_skipped_steps=1, check_every=1), max_steps=5)
    with pytest.raises(NonFiniteError, match=r"2 optimiser steps .*first at global step 0.*max_skipped_steps=1"):
        trainer_.fit(model, datamodule=Data(5, bad=[0, 3]))
    assert trainer_.global_step == 4 and all_finite(model)


def test_bad_guard_arguments_fail_clearly():
    with pytest.raises(ValueError, match="policy"):
        NonFiniteGuard("ignore")
    with pytest.raises(ValueError, match="max_skipped_steps"):
        NonFiniteGuard(max_skipped_steps=-1)
    with pytest.raises(ValueError, match="check_every"):
        NonFiniteGuard(check_every=0)


# -- the normal path is unchanged ------------------------------------------------------------------
class PlainAdamW:
    """The optimiser before the guard: torch's reference (single-tensor, non-fused) AdamW."""

    def configure_optimizers(self):
        self.build_schedules()
        return torch.optim.AdamW(
            self.optimizer_param_groups(), lr=float(self.lr_schedule[0]), betas=self.betas, foreach=False, fused=False
        )


class PlainMAE(PlainAdamW, MAE):
    pass


class PlainDINO(PlainAdamW, DINO):
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


@pytest.mark.parametrize("method", ["mae", "dino"])
def test_fused_adamw_and_guarded_ema_match_the_plain_implementations(method):
    guarded, plain = (mae(), PlainMAE(**MAE_TINY)) if method == "mae" else (dino(), PlainDINO(**DINO_TINY))
    plain.load_state_dict(guarded.state_dict())
    start = {k: v.clone() for k, v in guarded.state_dict().items()}
    for model in (guarded, plain):
        torch.manual_seed(1)  # the same masks
        trainer(max_steps=3).fit(model, datamodule=Data(3, views=method == "dino"))
    assert guarded.trainer.optimizers[0].param_groups[0]["fused"] is True
    assert plain.trainer.optimizers[0].param_groups[0]["fused"] is False
    moved = 0
    for key, value in guarded.state_dict().items():
        want = plain.state_dict()[key]
        if key.endswith("attn.qkv.bias"):
            # the key bias has an analytically zero gradient (softmax ignores a shift shared by all
            # keys): Adam normalises rounding noise there, which no two kernels agree on
            value, want = without_key_bias(value), without_key_bias(want)
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")
        moved += not torch.equal(value, start[key])
    assert moved > 10


def without_key_bias(qkv_bias: torch.Tensor) -> torch.Tensor:
    q, _, v = qkv_bias.chunk(3)
    return torch.cat([q, v])


# -- GradScaler, linear probe (LARS), host syncs ---------------------------------------------------
def test_under_a_grad_scaler_only_the_loss_counts_and_the_scaler_skips_bad_gradients():
    """fp16 AMP (the scaler, on CPU here): a NaN loss is skipped and counted; an inf gradient with a
    finite loss is the scaler's routine overflow skip: not applied, not counted, not refused."""
    model, record = mae(), Record()
    scaler = torch.amp.GradScaler("cpu")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer(NonFiniteGuard("stop", check_every=1), max_steps=3, plugins=[plugin], before_guard=[PoisonGradient([1])],
            callbacks=[record]).fit(model, datamodule=Data(3))
    assert trainer_ok(model, steps=3) and int(guard_of(model).skipped) == 0
    assert same(record.before[1], record.after[1]) == []  # the scaler skipped the step
    assert scaler.get_scale() == 65536.0 / 2  # ... and backed off once
    model = mae()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer(NonFiniteGuard(check_every=1), max_steps=3, plugins=[plugin]).fit(model, datamodule=Data(3, bad=[1]))
    assert trainer_ok(model, steps=3) and int(guard_of(model).skipped) == 1


def test_linear_probe_with_lars_is_rolled_back_with_its_batchnorm_and_momentum():
    """LARS has no fused kernel: the guard snapshots and restores the head, its momentum buffers and
    the BatchNorm statistics (a NaN batch would poison all three)."""
    torch.manual_seed(0)
    probe = LinearProbe(
        arch="vit_tiny_patch4_32", backbone_kwargs=dict(embed_dim=32, depth=1, num_heads=2), num_classes=2,
        protocol="mae", lr=0.1,
    )
    record = Record()
    labelled = Data(4, bad=[0, 2])
    labelled.dataset = [(x, i % 2) for i, (x, _) in enumerate(labelled.dataset)]
    head0 = {k: v.clone() for k, v in probe.head.state_dict().items()}
    trainer(max_steps=4, callbacks=[record]).fit(probe, datamodule=labelled)
    assert trainer_ok(probe, steps=4) and int(guard_of(probe).skipped) == 2
    changed = [same(b, a) for b, a in zip(record.before, record.after)]
    assert changed[2] == []
    assert any("momentum_buffer" in k for k in changed[3]) and "head.0.running_mean" in changed[3]
    # a bad first step: the head and its statistics as initialised, momentum created as zeros
    first = record.after[0]
    for key, value in head0.items():
        if value.is_floating_point():
            assert torch.equal(first[f"head.{key}"], value), key
    buffers = [v for k, v in first.items() if k.endswith("momentum_buffer")]
    assert buffers and all(not b.any() for b in buffers)


SYNCS = ("item", "__bool__", "__int__", "__float__", "tolist", "numpy", "cpu")


@pytest.mark.parametrize("method", ["mae", "dino"])
def test_no_host_sync_in_steps_that_are_not_check_steps(monkeypatch, method):
    """Every Tensor -> host conversion made from ssl_vit code during training is recorded with its
    step. On CPU nothing really waits, so this checks by construction: the only conversions are the
    guard's counter reads on check steps (and the schedules, which are CPU arrays)."""
    step = [None]
    calls = []

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            frame = inspect.currentframe().f_back
            while frame is not None:
                path = frame.f_code.co_filename
                if path.startswith(PACKAGE_DIR) and step[0] is not None:
                    calls.append((step[0], os.path.basename(path), frame.f_code.co_name, name))
                    break
                frame = frame.f_back
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    class Step(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            step[0] = trainer.global_step

    model = mae() if method == "mae" else dino()
    fit = trainer(NonFiniteGuard(check_every=3), max_steps=6, log_every_n_steps=1, callbacks=[Step()])
    for name in SYNCS:
        wrap(name)
    fit.fit(model, datamodule=Data(6, bad=[1], views=method == "dino"))
    assert int(guard_of(model).skipped) == 1
    syncs = [c for c in calls if c[1:3] != ("schedules.py", "at")]
    assert {c[1:3] for c in syncs} == {("nonfinite.py", "read")}
    assert sorted({c[0] for c in syncs}) == [2, 5]  # steps 2 and 5 (then the end of training)
