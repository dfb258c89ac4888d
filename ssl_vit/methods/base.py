"""The small base every training stage shares: AdamW with per-step learning-rate and weight-decay
schedules, the learning rate scaled by the global batch.

Subclasses pass their optimisation arguments to ``__init__`` (by keyword) and implement
``training_step``. Anything method-specific (EMA momentum, teacher temperature) lives in the subclass.
Operations (the non-finite guard, start-up checks, checkpoints, preemption) are opt-in callbacks in
``ssl_vit.training``; the only hook they use here is ``step_skipped``.
"""
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from torch import nn

from ssl_vit.methods.options import check_options
from ssl_vit.methods.schedules import at, cosine_schedule

# Devices whose fused AdamW kernels exist and honour `found_inf` (CPU since torch 2.4).
FUSED_DEVICES = ("cuda", "cpu")

# Tokens and position embeddings, which ``exempt_tokens=True`` also keeps from weight decay. Both
# references decay them (DINO ``utils.get_params_groups``, MAE ``add_weight_decay``: only biases and
# 1-D tensors are exempt); timm's ``no_weight_decay()`` and many later recipes exempt them.
# The ranges of the optimisation options every stage shares (``ssl_vit.methods.options``).
SCHEDULE_RANGES = {
    "base_lr": "[0, inf)", "lr": "(0, inf)", "min_lr": "[0, inf)", "warmup_epochs": "[0, inf)",
    "weight_decay": "[0, inf)", "weight_decay_end": "[0, inf)", "betas": "[0, 1)",
}

TOKENS = ("pos_embed", "cls_token", "reg_token", "mask_token", "decoder_pos_embed", "dist_token",
          "pos_embed_row", "pos_embed_col", "relative_position_bias_table")  # factorised, relative bias


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
        wd_exempt_tokens: also keep tokens and position embeddings (``TOKENS``) from weight decay
            (not the references' behaviour; an option).

    ``warmup_reaches_base`` (class attribute) picks the reference's warm-up convention (see
    ``cosine_schedule``): False as MAE, True as DINO.

    ``step_skipped`` is the hook for ``ssl_vit.training.NonFiniteGuard``: while it guards a run it
    holds a bool ``[]`` device tensor, true when this optimiser step is skipped (a stage with state
    outside its optimiser, like DINO's EMA teacher, holds it still then); ``None`` otherwise.
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
        wd_exempt_tokens: bool = False,
    ) -> None:
        super().__init__()
        options = dict(base_lr=base_lr, lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs, weight_decay=weight_decay,
                       weight_decay_end=weight_decay_end, betas=betas)
        check_options(type(self).__name__, options, SCHEDULE_RANGES)
        self.base_lr, self.lr, self.min_lr = base_lr, lr, min_lr
        self.warmup_epochs = warmup_epochs
        self.weight_decay = weight_decay
        self.weight_decay_end = weight_decay if weight_decay_end is None else weight_decay_end
        self.betas = tuple(betas)
        self.wd_exempt_tokens = wd_exempt_tokens
        self.lr_schedule: Optional[torch.Tensor] = None
        self.wd_schedule: Optional[torch.Tensor] = None
        self.step_skipped: Optional[torch.Tensor] = None

    # -- what subclasses may override ------------------------------------------------------------
    def optimizer_param_groups(self) -> List[Dict]:
        """Parameter groups for AdamW; the default decays every trainable parameter of the module
        except biases and 1-D tensors (and tokens with ``wd_exempt_tokens``)."""
        return param_groups(self.named_parameters(), self.weight_decay, exempt_tokens=self.wd_exempt_tokens)

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
        restores each rank's saved state (``ssl_vit.training.Checkpoint``)."""
        if self.trainer.world_size > 1:
            torch.manual_seed(rank_seed(torch.initial_seed(), self.global_rank))
