"""The DINO LightningModule: EMA, teacher isolation, gradient handling, schedules, learning, checkpoints."""
import math
from typing import List

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ssl_vit.checkpoints.format import CHECKPOINT_KEY
from ssl_vit.checkpoints.io import safe_torch_load
from ssl_vit.methods.dino import DINO, clip_grad_per_tensor_
from ssl_vit.models.backbone import create_backbone

TINY = dict(
    arch="vit_tiny_patch4_32", img_size=32, embed_dim=32, depth=2, num_heads=2,
    out_dim=64, head_hidden_dim=64, head_bottleneck_dim=16,
)


def tiny_dino(**overrides) -> DINO:
    kwargs = dict(TINY, warmup_epochs=0, lr=1e-3, drop_path_rate=0.0)
    kwargs.update(overrides)
    return DINO(**kwargs)


class Crops(Dataset):
    """``n`` random images, each as 2 global 32x32 crops and 2 local 16x16 crops."""

    def __init__(self, n: int = 8, seed: int = 0) -> None:
        self.images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i]
        return [x, x.flip(-1), x[:, :16, :16], x[:, 16:, 8:24]], -1


class CropsModule(pl.LightningDataModule):
    def __init__(self, n: int = 8, batch_size: int = 4) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Crops(self.n), batch_size=self.batch_size)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, max_epochs=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def snapshot(module: torch.nn.Module) -> List[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_teacher_starts_as_student_without_drop_path_and_without_gradients():
    model = tiny_dino(drop_path_rate=0.1)
    for (name, s), (_, t) in zip(model.student.state_dict().items(), model.teacher.state_dict().items()):
        assert torch.equal(s, t), name
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert model.student.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert not hasattr(model.teacher.backbone.blocks[-1].drop_path1, "drop_prob")  # Identity
    keys = set(model.state_dict())
    assert {"loss.center", "student.head.last_layer.parametrizations.weight.original1"} <= keys
    assert any(k.startswith("teacher.backbone.blocks.") for k in keys)


def test_ema_update_equals_the_formula():
    torch.manual_seed(0)
    model = tiny_dino()
    with torch.no_grad():
        for p in list(model.student.parameters()) + list(model.teacher.parameters()):
            p.add_(torch.randn_like(p))
    teacher, student = snapshot(model.teacher), snapshot(model.student)
    model.update_teacher(0.7)
    for new, t, s in zip(model.teacher.parameters(), teacher, student):
        torch.testing.assert_close(new, 0.7 * t + 0.3 * s)
    assert all(torch.equal(a, b) for a, b in zip(model.student.parameters(), student))  # student untouched


def test_per_tensor_clipping_equals_the_reference_loop():
    torch.manual_seed(0)
    grads = [torch.randn(5) * 10, torch.randn(3, 4) * 0.01, torch.randn(2, 2) * 2]
    want = []
    for g in grads:
        coef = 3.0 / (g.norm() + 1e-6)
        want.append(g * coef if coef < 1 else g.clone())
    clip_grad_per_tensor_(grads, 3.0)
    for got, w in zip(grads, want):
        torch.testing.assert_close(got, w)
    assert grads[0].norm() == pytest.approx(3.0, rel=1e-5)


def test_teacher_never_gets_gradients_nor_optimiser_updates():
    """Momentum 1 makes the EMA a no-op: the teacher must then be bit-identical after training."""
    model = tiny_dino(momentum_teacher=1.0)
    teacher0, student0 = snapshot(model.teacher), snapshot(model.student)
    seen = []

    class Check(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(all(p.grad is None for p in pl_module.teacher.parameters()))
            opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            assert not opt_ids & {id(p) for p in pl_module.teacher.parameters()}
            assert opt_ids == {id(p) for p in pl_module.student.parameters() if p.requires_grad}

    trainer(max_steps=2, callbacks=[Check()]).fit(model, datamodule=CropsModule())
    assert seen == [True, True]
    assert all(torch.equal(a, b) for a, b in zip(model.teacher.parameters(), teacher0))
    assert not all(torch.equal(a, b) for a, b in zip(model.student.parameters(), student0))


def test_last_layer_frozen_in_epoch_zero_only_and_gradients_clipped_before_the_step():
    model = tiny_dino(freeze_last_layer=1, clip_grad=1e-3)
    last = model.student.head.last_layer.parametrizations.weight.original1
    mlp = model.student.head.mlp[0].weight
    at_epoch_end, grads_at_step = [], []

    class Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            def post_step(optimizer, args, kwargs):  # the gradients the optimiser step just used
                norms = [p.grad.norm().item() for p in pl_module.student.parameters() if p.grad is not None]
                grads_at_step.append((trainer.current_epoch, last.grad is None, max(norms)))

            trainer.optimizers[0].register_step_post_hook(post_step)

        def on_train_epoch_end(self, trainer, pl_module):
            at_epoch_end.append((last.detach().clone(), mlp.detach().clone()))

    last0, mlp0 = last.detach().clone(), mlp.detach().clone()
    trainer(max_epochs=2, callbacks=[Record()]).fit(model, datamodule=CropsModule())
    (last1, mlp1), (last2, mlp2) = at_epoch_end
    assert torch.equal(last1, last0)  # epoch 0: last layer untouched (no update, no weight decay)
    assert not torch.equal(mlp1, mlp0)  # ... while the rest of the student trains
    assert not torch.equal(last2, last1)  # epoch 1: last layer trains
    assert [(e, frozen) for e, frozen, _ in grads_at_step] == [(0, True), (0, True), (1, False), (1, False)]
    assert max(n for _, _, n in grads_at_step) <= 1e-3 * (1 + 1e-4)


def test_ema_runs_once_per_optimiser_step_with_that_steps_momentum():
    model = tiny_dino(momentum_teacher=0.9)
    momenta = []
    original = model.update_teacher
    model.update_teacher = lambda m: (momenta.append(m), original(m))[1]
    teacher0 = snapshot(model.teacher)
    # 8 samples / batch 2 = 4 micro-batches, accumulated by 2: 2 optimiser steps in 1 epoch
    trainer(accumulate_grad_batches=2).fit(model, datamodule=CropsModule(8, 2))
    assert model.global_step == 2
    assert momenta == pytest.approx([0.9, 0.95])  # cosine 0.9 -> 1 over 2 steps, indexed by step
    assert not all(torch.equal(a, b) for a, b in zip(model.teacher.parameters(), teacher0))


@pytest.mark.parametrize("final,expected", [
    (None, [0.99, 0.99 + 0.01 * (1 - math.cos(math.pi / 4)) / 2, 0.995,
            0.99 + 0.01 * (1 - math.cos(3 * math.pi / 4)) / 2]),
    (0.99, [0.99] * 4),  # the demo's: a constant momentum, the teacher never freezes
    (0.98, [0.99, 0.99 - 0.01 * (1 - math.cos(math.pi / 4)) / 2, 0.985,
            0.99 - 0.01 * (1 - math.cos(3 * math.pi / 4)) / 2]),
])
def test_momentum_teacher_final_is_where_the_cosine_ends(final, expected):
    model = tiny_dino(momentum_teacher=0.99, **({} if final is None else {"momentum_teacher_final": final}))
    momenta = []
    original = model.update_teacher
    model.update_teacher = lambda m: (momenta.append(m), original(m))[1]
    trainer().fit(model, datamodule=CropsModule(8, 2))  # 4 steps
    assert momenta == pytest.approx(expected)


def test_momentum_teacher_final_is_checked():
    with pytest.raises(ValueError, match="momentum_teacher_final"):
        tiny_dino(momentum_teacher_final=1.01)


@pytest.mark.parametrize("per_step,expected", [
    (False, [0.04] * 4 + [0.07] * 4),  # the reference: linspace(0.04, 0.07, 1)[epoch], then 0.07
    (True, [0.04, 0.05, 0.06, 0.07, 0.07, 0.07, 0.07, 0.07]),  # the option: a ramp over the steps
])
def test_schedules_and_logged_metrics(per_step, expected):
    model = tiny_dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=1, teacher_temp_per_step=per_step)
    logged = []

    class Log(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer(max_epochs=2, callbacks=[Log()]).fit(model, datamodule=CropsModule(8, 2))  # 4 steps per epoch
    temps = [m["train/teacher_temp"] for m in logged]
    assert temps == pytest.approx(expected)
    assert logged[0]["train/momentum"] == pytest.approx(0.996)
    assert {"train/loss", "train/lr", "train/wd", "train/teacher_entropy", "train/teacher_kl_to_centre"} <= set(logged[0])
    assert all(0 < m["train/teacher_entropy"] < math.log(64) for m in logged)


class Distinct(Crops):
    """Images a ViT tells apart at init (a colour plus a sine grating of its own frequency), so the
    teacher starts un-collapsed; pure noise looks alike to a random ViT and collapses at once."""

    def __init__(self, n: int = 8, seed: int = 0) -> None:
        colours = torch.randn(n, 3, 1, 1, generator=torch.Generator().manual_seed(seed)) * 2
        freq = torch.arange(n, dtype=torch.float32)[:, None, None, None]
        xs = torch.linspace(0, 2 * math.pi, 32)
        self.images = colours + torch.sin(freq * xs[None, None, None, :] + freq * xs[None, None, :, None])


def test_a_few_steps_on_one_batch_lower_the_loss_without_collapse():
    torch.manual_seed(0)
    model = tiny_dino(lr=1e-3, momentum_teacher=0.9, freeze_last_layer=0, weight_decay=0.0, weight_decay_end=0.0)
    losses, entropies, kls = [], [], []

    class Log(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["train/loss"]))
            entropies.append(float(trainer.callback_metrics["train/teacher_entropy"]))
            kls.append(float(trainer.callback_metrics["train/teacher_kl_to_centre"]))

    class OneBatch(CropsModule):
        def train_dataloader(self):
            return DataLoader(Distinct(8), batch_size=8)

    trainer(max_epochs=8, callbacks=[Log()]).fit(model, datamodule=OneBatch(8, 8))
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(1e-3 < h < math.log(64) - 0.1 for h in entropies), entropies  # neither one-hot nor uniform
    assert all(kl > 0.3 for kl in kls), kls  # samples keep different teacher distributions


def test_checkpoint_metadata_rebuilds_the_teacher_backbone_and_restores_the_centre(tmp_path):
    model = tiny_dino()
    t = trainer(max_steps=1)
    t.fit(model, datamodule=CropsModule())
    assert model.loss.center.abs().sum() > 0
    path = tmp_path / "dino.ckpt"
    t.save_checkpoint(path)
    ckpt = safe_torch_load(path)
    meta = ckpt[CHECKPOINT_KEY]
    assert meta["method"] == "dino" and meta["default"] == "teacher"
    assert meta["backbones"] == {"teacher": "teacher.backbone.", "student": "student.backbone."}
    backbone = create_backbone(meta["arch"], **meta["backbone_kwargs"])
    prefix = meta["backbones"]["teacher"]
    backbone.load_state_dict({k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(backbone.eval()(x), model.eval()(x))
    restored = DINO.load_from_checkpoint(path)
    assert torch.equal(restored.loss.center, model.loss.center)


def test_mlp_ratio_sizes_both_backbones_and_travels_with_the_checkpoint(tmp_path):
    from ssl_vit.checkpoints.load import load_backbone

    model = tiny_dino(mlp_ratio=2.0)
    for net in (model.student, model.teacher):
        assert {block.mlp.fc1.out_features for block in net.backbone.blocks} == {2 * TINY["embed_dim"]}
    t = trainer(max_steps=1)
    t.fit(model, datamodule=CropsModule())
    t.save_checkpoint(tmp_path / "dino.ckpt")
    backbone = load_backbone(tmp_path / "dino.ckpt")
    assert backbone.blocks[0].mlp.fc1.out_features == 2 * TINY["embed_dim"]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(backbone.eval()(x), model.eval()(x))


def test_bad_configuration_and_batches_fail_clearly():
    with pytest.raises(ValueError, match="mlp_ratio"):
        tiny_dino(mlp_ratio=0.0)
    with pytest.raises(ValueError, match="teacher_temp"):
        tiny_dino(teacher_temp=0.0)
    with pytest.raises(ValueError, match="momentum_teacher"):
        tiny_dino(momentum_teacher=1.5)
    with pytest.raises(ValueError, match="gradient_clip_val"):
        trainer(max_steps=1, gradient_clip_val=1.0).fit(tiny_dino(), datamodule=CropsModule())

    class OneView(CropsModule):
        def train_dataloader(self):
            return DataLoader([(torch.randn(3, 32, 32), -1)] * 4, batch_size=4)

    with pytest.raises(ValueError, match="list of crops"):
        trainer(max_steps=1).fit(tiny_dino(), datamodule=OneView())


def test_cls_token_init_is_the_references():
    """DINO's reference initialises the CLS token with trunc_normal(std=0.02) (timm: N(0, 1e-6));
    the teacher starts as a copy of the student."""
    torch.manual_seed(0)
    model = DINO(arch="vit_tiny_patch16", img_size=32, embed_dim=4096, depth=1, num_heads=4, out_dim=8,
                 head_hidden_dim=8, head_bottleneck_dim=4)
    token = model.student.backbone.cls_token.detach().flatten()
    assert 0.018 < float(token.std()) < 0.022  # timm alone would give ~1e-6
    assert torch.equal(model.teacher.backbone.cls_token, model.student.backbone.cls_token)


def test_bottleneck_koleo_adds_its_term_on_the_global_crops_and_is_off_by_default():
    from ssl_vit.losses.koleo import koleo_loss

    assert DINO(**TINY).bottleneck_koleo_weight == 0.0  # the reference by default
    crops, _ = next(iter(DataLoader(Distinct(4), batch_size=4)))
    torch.manual_seed(0)
    model = tiny_dino(bottleneck_koleo_weight=0.5)
    reference = tiny_dino()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits, bottleneck = model.student(crops, return_bottleneck=True)
        assert torch.equal(logits, model.student(crops)) and bottleneck.shape == (4 * 4, TINY["head_bottleneck_dim"])
        want = float(sum(koleo_loss(z) for z in bottleneck[:8].chunk(2)) / 2)  # the 2 global crops' rows
    logged = []

    class Log(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    class OneBatch(CropsModule):
        def train_dataloader(self):
            return DataLoader(Distinct(4), batch_size=4)

    trainer(max_steps=1, callbacks=[Log()]).fit(model, datamodule=OneBatch(4, 4))
    trainer(max_steps=1, callbacks=[Log()]).fit(reference, datamodule=OneBatch(4, 4))
    with_koleo, without = logged
    assert "train/bottleneck_koleo" in with_koleo and "train/bottleneck_koleo" not in without
    assert with_koleo["train/bottleneck_koleo"] == pytest.approx(want, rel=1e-5)
    assert with_koleo["train/loss"] == pytest.approx(without["train/loss"] + 0.5 * want, rel=1e-5)
    logged.clear()  # a batch of one image has no nearest neighbour: no term, and no error
    trainer(max_steps=1, callbacks=[Log()]).fit(tiny_dino(bottleneck_koleo_weight=0.5), datamodule=CropsModule(1, 1))
    assert "train/bottleneck_koleo" not in logged[0] and math.isfinite(logged[0]["train/loss"])
    with pytest.raises(ValueError, match="bottleneck_koleo_weight"):
        tiny_dino(bottleneck_koleo_weight=-1.0)
