"""The small base every training stage shares: AdamW with per-step learning-rate and weight-decay
schedules, the learning rate scaled by the global batch.

Subclasses pass their optimisation arguments to ``__init__`` and implement ``training_step``.
Anything method-specific (EMA momentum, teacher temperature) lives in the subclass.

Every stage also gets the non-finite guard (``ssl_vit.methods.nonfinite``): a step whose loss or
gradient norm is NaN/inf is skipped on the device, without a per-step host sync. Subclasses that
override ``on_train_start``, ``on_before_backward``, ``on_before_optimizer_step``, ``optimizer_step``,
``on_train_batch_end`` or ``on_train_end`` call ``super()``.
"""
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from torch import nn

from ssl_vit.methods.checks import check_run
from ssl_vit.methods.nonfinite import NonFiniteGuard, Policy, supports_found_inf, validate_policy
from ssl_vit.methods.schedules import at, cosine_schedule

# Devices whose fused AdamW kernels exist and honour `found_inf` (CPU since torch 2.4).
FUSED_DEVICES = ("cuda", "cpu")

# Tokens and position embeddings, which ``exempt_tokens=True`` also keeps from weight decay. Both
# references decay them (DINO ``utils.get_params_groups``, MAE ``add_weight_decay``: only biases and
# 1-D tensors are exempt); timm's ``no_weight_decay()`` and many later recipes exempt them.
TOKENS = ("pos_embed", "cls_token", "reg_token", "mask_token", "decoder_pos_embed", "dist_token")


def param_groups(
    named_params: Iterable[Tuple[str, nn.Parameter]], weight_decay: float, lr_scale: float = 1.0,
    exempt_tokens: bool = False,
) -> List[Dict]:
    """Split trainable parameters into a decayed and an undecayed group, as both references do: no
    decay on biases and 1-D tensors (norm weights); with ``exempt_tokens`` none on ``TOKENS`` either.
    Each group carries ``lr_scale`` and ``apply_wd``."""
    decay, no_decay = [], []
    exempt = TOKENS if exempt_tokens else ()
    for name, param in named_params:
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in exempt:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "apply_wd": True, "lr_scale": lr_scale},
        {"params": no_decay, "weight_decay": 0.0, "apply_wd": False, "lr_scale": lr_scale},
    ]
    return [g for g in groups if g["params"]]


def global_batch_size(trainer: "pl.Trainer") -> int:
    """Images per optimiser step across all processes: per-device batch x devices x accumulation."""
    datamodule = getattr(trainer, "datamodule", None)
    batch_size = getattr(datamodule, "batch_size", None)
    if batch_size is None:
        raise ValueError(
            "cannot scale the learning rate by the global batch: the datamodule has no batch_size; "
            "set `lr` explicitly instead of `base_lr`"
        )
    return int(batch_size) * trainer.world_size * trainer.accumulate_grad_batches


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of process ``rank`` in a run seeded ``seed`` (distinct per rank, 63 bits)."""
    return (seed + 1_000_003 * rank) % 2**63


class ScheduledModule(pl.LightningModule):
    """AdamW whose learning rate and weight decay follow per-step cosine schedules.

    Args:
        base_lr: learning rate for a global batch of 256; the actual peak is
            ``base_lr * global_batch / 256`` unless ``lr`` is given.
        lr: absolute peak learning rate (overrides ``base_lr`` scaling).
        min_lr: final learning rate of the cosine.
        warmup_epochs: linear warm-up length, in epochs (fractions allowed).
        weight_decay: weight decay at the start.
        weight_decay_end: weight decay at the end (cosine); ``None`` keeps it constant.
        betas: AdamW betas.
        on_nonfinite: what a step with a non-finite loss or gradient norm does: ``"skip"`` (the
            step is not applied and is counted) or ``"stop"`` (not applied; training then raises
            ``NonFiniteError`` at the next check, naming the step and the last checkpoint).
        max_skipped_steps: under ``"skip"``, raise once more steps than this were skipped since
            the run (re)started; ``None``: never.
        nonfinite_check_every: optimiser steps between the host reads of the skip counters (the
            only host sync of the guard); ``None``: ``trainer.log_every_n_steps``.
        wd_exempt_tokens: also keep tokens and position embeddings (``TOKENS``) from weight decay
            (not the references' behaviour; an option).

    ``warmup_reaches_base`` (class attribute) picks the reference's warm-up convention (see
    ``cosine_schedule``): False as MAE, True as DINO.
    """

    warmup_reaches_base = False

    def __init__(
        self,
        base_lr: float = 1.5e-4,
        lr: Optional[float] = None,
        min_lr: float = 0.0,
        warmup_epochs: float = 0.0,
        weight_decay: float = 0.05,
        weight_decay_end: Optional[float] = None,
        betas: Sequence[float] = (0.9, 0.999),
        on_nonfinite: Policy = "skip",
        max_skipped_steps: Optional[int] = 100,
        nonfinite_check_every: Optional[int] = None,
        wd_exempt_tokens: bool = False,
    ) -> None:
        super().__init__()
        validate_policy(on_nonfinite, max_skipped_steps, nonfinite_check_every)
        for name, value in dict(base_lr=base_lr, min_lr=min_lr, warmup_epochs=warmup_epochs, weight_decay=weight_decay).items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if lr is not None and lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.base_lr, self.lr, self.min_lr = base_lr, lr, min_lr
        self.warmup_epochs = warmup_epochs
        self.weight_decay = weight_decay
        self.weight_decay_end = weight_decay if weight_decay_end is None else weight_decay_end
        self.betas = tuple(betas)
        self.wd_exempt_tokens = wd_exempt_tokens
        self.lr_schedule: Optional[torch.Tensor] = None
        self.wd_schedule: Optional[torch.Tensor] = None
        self.nonfinite = NonFiniteGuard(on_nonfinite, max_skipped_steps, nonfinite_check_every)

    # -- what subclasses may override ------------------------------------------------------------
    def optimizer_param_groups(self) -> List[Dict]:
        """Parameter groups for AdamW; the default decays every trainable parameter of the module
        except biases and 1-D tensors (and tokens with ``wd_exempt_tokens``)."""
        return param_groups(self.named_parameters(), self.weight_decay, exempt_tokens=self.wd_exempt_tokens)

    def setup(self, stage: str) -> None:
        """Start-up checks, before any compute (``ssl_vit.methods.checks.check_run``: image sizes
        against the patch size...). Subclasses that override ``setup`` call ``super()`` first."""
        check_run(self, stage)

    # -- schedules -------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("schedules need a finite run: set trainer.max_epochs or trainer.max_steps")
        return max(int(total), 1)

    @property
    def steps_per_epoch(self) -> float:
        """Optimiser steps per epoch (from the dataloader length, or total / max_epochs)."""
        trainer = self.trainer
        if trainer.max_epochs and trainer.max_epochs > 0 and trainer.max_steps in (-1, None):
            return self.total_steps / trainer.max_epochs
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            # Under max_steps, estimated_stepping_batches does not load the data: do it (as it would).
            trainer.fit_loop.setup_data()
            batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("the training dataloader has no length: set trainer.max_epochs")
        return max(batches // trainer.accumulate_grad_batches, 1)

    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return self.base_lr * global_batch_size(self.trainer) / 256

    def build_schedules(self) -> None:
        """Precompute the per-step arrays; called once the trainer knows the run length."""
        total = self.total_steps
        warmup = round(self.warmup_epochs * self.steps_per_epoch)
        self.lr_schedule = cosine_schedule(self.peak_lr(), self.min_lr, total, warmup,
                                           warmup_reaches_base=self.warmup_reaches_base)
        self.wd_schedule = cosine_schedule(self.weight_decay, self.weight_decay_end, total)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.build_schedules()
        # fused kernels honour `found_inf`, which the non-finite guard uses to skip a step on device
        fused = True if self.device.type in FUSED_DEVICES else None
        return torch.optim.AdamW(
            self.optimizer_param_groups(), lr=float(self.lr_schedule[0]), betas=self.betas, fused=fused
        )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        step = self.global_step
        lr, wd = at(self.lr_schedule, step), at(self.wd_schedule, step)
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
                if group.get("apply_wd", True):
                    group["weight_decay"] = wd
        self.log_dict({"train/lr": lr, "train/wd": wd}, on_step=True, on_epoch=False, batch_size=1)

    def on_fit_start(self) -> None:
        """Give each process its own random stream (MAE masks, drop path): ``seed_everything`` seeds
        every rank alike, so without this all ranks would mask the same patches (the reference MAE
        seeds ``seed + rank``). Runs after DDP has broadcast rank 0's weights; a resumed run then
        restores each rank's saved state (``ssl_vit.callbacks.Checkpoint``)."""
        if self.trainer.world_size > 1:
            torch.manual_seed(rank_seed(torch.initial_seed(), self.global_rank))

    # -- the non-finite guard (ssl_vit.methods.nonfinite) ------------------------------------------
    def on_train_start(self) -> None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        held = [b for b in self.buffers() if b.is_floating_point()]  # BatchNorm statistics, DINO centre
        every = self.trainer.log_every_n_steps or 50
        self.nonfinite.start(self.device, held, loss_only=scaler is not None, check_every=every)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.nonfinite.observe_loss(loss)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Decide on the device whether this step is applied, and log the total gradient norm."""
        if not self.nonfinite.active:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and supports_found_inf(optimizer):
            # Lightning leaves gradients scaled for optimisers that unscale in their step (fused);
            # unscale them now, so that norms and clipping see true values (the scaler's step
            # then uses grad_scale=None and the inf check of this call)
            scaler.unscale_(optimizer)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        world = self.trainer.world_size
        reduce = (lambda t: self.all_gather(t).amax()) if world > 1 else (lambda t: t)
        _, norm = self.nonfinite.flag(grads, self.global_step, reduce)
        self.nonfinite.arm(optimizer)
        self.log_dict(
            {"train/grad_norm": norm, "train/skipped_steps": self.nonfinite.skipped.float()},
            on_step=True, on_epoch=False, batch_size=1,
        )

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.nonfinite.active:
            self.nonfinite.after_step()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.nonfinite.due():
            self.nonfinite.check(self.last_checkpoint_path())

    def on_train_end(self) -> None:
        self.nonfinite.check(self.last_checkpoint_path())
        self.nonfinite.stop()

    def last_checkpoint_path(self) -> str:
        """The most recent checkpoint of the trainer's checkpoint callback ("" if none yet)."""
        callback = self.trainer.checkpoint_callback
        if callback is None:
            return ""
        return getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "") or ""


# Every ssl_vit Lightning checkpoint carries this entry, so that `load_backbone` can rebuild the
# backbone with no other information: {"method", "arch", "backbone_kwargs", "backbones", "default"}.
CHECKPOINT_KEY = "ssl_vit"


def backbone_metadata(
    method: str, arch: str, backbone_kwargs: Dict, backbones: Dict[str, str], default: str
) -> Dict:
    """The ``checkpoint["ssl_vit"]`` entry.

    Args:
        method: ``"mae"``, ``"dino"``, ``"probe"``, ``"finetune"``.
        arch: the ``create_backbone`` name.
        backbone_kwargs: the ``create_backbone`` keyword arguments (``img_size``, ``pos_embed``...).
        backbones: role -> state-dict prefix of that backbone, e.g. ``{"teacher": "teacher.backbone.",
            "student": "student.backbone."}``.
        default: the role ``load_backbone`` returns when none is asked for.
    """
    if default not in backbones:
        raise ValueError(f"default backbone {default!r} is not one of {sorted(backbones)}")
    return {
        "method": method,
        "arch": arch,
        "backbone_kwargs": dict(backbone_kwargs),
        "backbones": dict(backbones),
        "default": default,
    }
