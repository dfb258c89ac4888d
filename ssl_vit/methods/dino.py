"""DINO pretraining (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

A student (ViT + DINOHead) is trained to match a teacher of the same architecture on different
crops of the same image; the teacher is an exponential moving average of the student and never
receives gradients. Collapse is avoided by centring and sharpening the teacher's output.

Where each step happens (per optimiser step, in Lightning's order):

1. ``on_train_batch_start`` (ScheduledModule): learning rate and weight decay of this step.
2. ``training_step``: teacher on the 2 global crops (no grad), student on all crops, DINO loss with
   this step's teacher temperature; the centre is updated (all-reduced) inside the loss.
3. ``on_before_optimizer_step``: (with ``ssl_vit.training.NonFiniteGuard``, whose hook runs first,
   the guard decides on the device whether this step is applied;) then ALL gradient handling, on
   unscaled gradients: per-tensor clipping to ``clip_grad`` (as the reference ``clip_gradients``),
   then the head's last layer gradients are set to None during the first ``freeze_last_layer``
   epochs (AdamW then skips it entirely: no update, no weight decay). Trainer-level ``gradient_clip_val`` is refused (it would clip twice).
4. ``optimizer_step``: the optimiser step, and right after it the teacher EMA with this step's
   momentum. Lightning calls ``optimizer_step`` only on real optimiser steps, so under gradient
   accumulation the teacher moves once per optimiser step, like the student. On a step the guard
   skipped (``step_skipped``), the student, the teacher and the centre all keep their values (no
   host sync: the EMA momentum becomes the device tensor ``where(bad, 1, m)``; the guard rolls the
   centre back).
"""
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from ssl_vit.checkpoints.format import CHECKPOINT_KEY, stage_metadata
from ssl_vit.data.device_augment import augment_batch, device_augment_for
from ssl_vit.losses.dino import DINOLoss, teacher_stats
from ssl_vit.losses.koleo import koleo_loss
from ssl_vit.methods.base import ScheduledModule, param_groups
from ssl_vit.methods.options import check_options
from ssl_vit.methods.schedules import at, cosine_schedule, linear_then_constant
from ssl_vit.models.backbone import PosEmbed, Stem, create_backbone
from ssl_vit.models.dino_head import DINOHead, MultiCropNet
from ssl_vit.models.pos_embed import PosEmbedResample
from ssl_vit.models.speed import configure_blocks

# Lightning warns whenever a module overrides on_after_batch_transfer while a DataModule is used;
# DINO's override (device-side augmentation) is deliberate.
warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer` in `LightningModule`.*")

# Ranges of DINO's own options (``ssl_vit.methods.options``; the optimisation ones are the base's).
DINO_RANGES = {
    "drop_path_rate": "[0, 1]", "student_temp": "(0, inf)", "warmup_teacher_temp": "(0, inf)",
    "teacher_temp": "(0, inf)", "warmup_teacher_temp_epochs": "[0, inf)", "momentum_teacher": "[0, 1]",
    "momentum_teacher_final": "[0, 1]", "center_momentum": "[0, 1]", "freeze_last_layer": "[0, inf)",
    "clip_grad": "[0, inf)",
    "bottleneck_koleo_weight": "[0, inf)", "mlp_ratio": "(0, inf)",
}
NUM_GLOBAL_CROPS = 2  # the teacher sees the first two crops of every batch


@torch.no_grad()
def clip_grad_per_tensor_(grads: List[Tensor], max_norm: float, eps: float = 1e-6) -> None:
    """Scale every gradient tensor whose L2 norm exceeds ``max_norm`` down to norm ``max_norm``,
    independently of the others (the reference ``clip_gradients``), with foreach kernels::

        g <- g * min(1, max_norm / (||g|| + eps))
    """
    if not grads:
        return
    scale = torch._foreach_norm(grads)  # list of 0-d tensors
    torch._foreach_add_(scale, eps)
    torch._foreach_reciprocal_(scale)
    torch._foreach_mul_(scale, max_norm)
    torch._foreach_clamp_max_(scale, 1.0)
    torch._foreach_mul_(grads, scale)


class DINO(ScheduledModule):
    """Student/teacher self-distillation of a timm ViT.

    Module layout (state-dict keys): ``student.backbone.*``, ``student.head.*``,
    ``teacher.backbone.*``, ``teacher.head.*`` and the loss centre ``loss.center`` ``[1, K]``.

    Args:
        arch: ``create_backbone`` name (``vit_small_patch16``...).
        img_size: resolution the position embedding is built for (global crop size); local crops
            use the on-the-fly resampled embedding.
        patch_size: overrides the patch size of ``arch``.
        embed_dim, depth, num_heads: override the width / depth / heads of ``arch`` (custom sizes).
        mlp_ratio: overrides the blocks' MLP width / block width of ``arch`` (4 in every ViT size).
        drop_path_rate: stochastic depth of the student (the teacher has none).
        out_dim: number of prototypes ``K``.
        head_hidden_dim: hidden width of the head MLP.
        head_bottleneck_dim: bottleneck width before the prototypes.
        head_nlayers: linear layers in the head MLP.
        head_use_bn: BatchNorm in the head MLP.
        norm_last_layer: freeze the prototypes' norm at 1.
        student_temp: student softmax temperature.
        warmup_teacher_temp: teacher temperature of the first epoch.
        teacher_temp: teacher temperature after ``warmup_teacher_temp_epochs`` (linear ramp).
        warmup_teacher_temp_epochs: ramp length in epochs (0: constant ``teacher_temp``). As the
            reference, the temperature changes once per epoch (``linspace(warmup, final, W)[epoch]``),
            so ``W`` must be a whole number unless ``teacher_temp_per_step``.
        teacher_temp_per_step: ramp the temperature every optimiser step instead of every epoch
            (smoother; not the reference's behaviour).
        momentum_teacher: EMA momentum at step 0; a cosine takes it to ``momentum_teacher_final`` at
            the end of training.
        momentum_teacher_final: the EMA momentum of the last step: 1 (the reference), so the teacher
            stops following the student as training ends. Below 1 the teacher keeps averaging the
            last steps: in a short run, where the student is still improving at the end, a teacher
            frozen early lags it (the demo recipe: 0.99, constant).
        center_momentum: EMA momentum of the centre.
        freeze_last_layer: epochs during which the head's last layer is not updated.
        clip_grad: per-tensor gradient norm limit (0 disables clipping).
        bottleneck_koleo_weight: weight of a KoLeo term (``ssl_vit.losses.koleo``, DINOv2's regulariser,
            which DINOv2 puts on the CLS token) on the student head's bottleneck output of each global
            crop, averaged over the two (none on a batch of one image). 0 (the default) is the
            reference. Not in DINO: it keeps the bottleneck vectors of different images from lining
            up, the drift that leaves the centred teacher output uniform on small data (the demo's
            digits, docs/fidelity.md).
        base_lr, lr, min_lr, warmup_epochs, weight_decay, weight_decay_end, betas: see
            ``ScheduledModule`` (DINO: 5e-4 per 256 images, 10 warm-up epochs, 1e-6, 0.04 -> 0.4).
            The warm-up reaches the peak at its last step, as the reference ``cosine_scheduler``.
        wd_exempt_tokens: keep ``pos_embed`` and ``cls_token`` from weight decay (the reference
            decays every parameter that is not a bias or 1-D).
        pos_embed_resample: how the position embedding is resampled for crops other than
            ``img_size`` (the local crops): ``"dino"``, the reference's ``interpolate_pos_encoding``,
            or ``"timm"``, timm's size-based antialiased resize. Recorded in checkpoints, so
            evaluation at other resolutions uses the same convention.
        compile_blocks: ``torch.compile`` every student and teacher block (GPU runs; one graph per
            crop resolution, see ``ssl_vit.models.speed``).
        grad_checkpointing: recompute the student's blocks in backward (activation memory).
        compile_augment: ``torch.compile`` the device-side augmentation used when the train
            transform is ``ssl_vit.data.gpu_augment.MultiCropCrops`` (GPU runs).
        pos_embed: the backbones' position embedding (``create_backbone``): ``"learn"`` (the
            reference), ``"sincos"``, ``"factorized"``, ``"none"``, ``"rope"`` or ``"rel_bias"``. A
            relative bias table fits one patch grid: the start-up checks refuse crops of another size
            (the local crops), so ``"rel_bias"`` trains only with global crops.
        stem: ``"patch"`` or ``"conv"`` (Xiao et al.; its BatchNorm statistics are per process and
            the teacher keeps its own, as buffers are not averaged).

    Augmentation on the device: when the datamodule's ``train_transform`` is ``MultiCropCrops`` (crops
    and flips only, uint8 views), colour jitter, grayscale, blur, solarisation and normalisation run
    batched on the device in ``on_after_batch_transfer``, with the CPU path's distribution; when it is
    ``MultiCropTransform(uint8_views=True)``, only the normalisation runs there (the same floats).
    """

    def __init__(
        self,
        arch: str = "vit_small_patch16",
        img_size: int = 224,
        patch_size: Optional[int] = None,
        embed_dim: Optional[int] = None,
        depth: Optional[int] = None,
        num_heads: Optional[int] = None,
        mlp_ratio: Optional[float] = None,
        drop_path_rate: float = 0.1,
        out_dim: int = 65536,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_nlayers: int = 3,
        head_use_bn: bool = False,
        norm_last_layer: bool = True,
        student_temp: float = 0.1,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: float = 0,
        teacher_temp_per_step: bool = False,
        momentum_teacher: float = 0.996,
        momentum_teacher_final: float = 1.0,
        center_momentum: float = 0.9,
        freeze_last_layer: int = 1,
        clip_grad: float = 3.0,
        bottleneck_koleo_weight: float = 0.0,
        base_lr: float = 5e-4,
        lr: Optional[float] = None,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10,
        weight_decay: float = 0.04,
        weight_decay_end: Optional[float] = 0.4,
        betas: Sequence[float] = (0.9, 0.999),
        wd_exempt_tokens: bool = False,
        pos_embed_resample: PosEmbedResample = "dino",
        compile_blocks: bool = False,
        grad_checkpointing: bool = False,
        compile_augment: bool = False,
        pos_embed: PosEmbed = "learn",
        stem: Stem = "patch",
    ) -> None:
        super().__init__(
            base_lr=base_lr, lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs, weight_decay=weight_decay,
            weight_decay_end=weight_decay_end, betas=betas, wd_exempt_tokens=wd_exempt_tokens,
        )
        self.save_hyperparameters()
        check_options("DINO", self.hparams, DINO_RANGES)
        if not teacher_temp_per_step and float(warmup_teacher_temp_epochs) != int(warmup_teacher_temp_epochs):
            raise ValueError(
                f"DINO: warmup_teacher_temp_epochs={warmup_teacher_temp_epochs} is not a whole number of epochs; "
                "the temperature changes once per epoch (as the reference) unless teacher_temp_per_step=true"
            )
        self.arch = arch
        overrides = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         mlp_ratio=mlp_ratio)
        # the create_backbone arguments that define the architecture (stored in checkpoints)
        self.backbone_kwargs: Dict[str, Any] = dict(img_size=img_size)
        self.backbone_kwargs.update({k: v for k, v in overrides.items() if v is not None})
        self.backbone_kwargs["pos_embed_resample"] = pos_embed_resample
        if pos_embed != "learn":
            self.backbone_kwargs["pos_embed"] = pos_embed
        if stem != "patch":
            self.backbone_kwargs["stem"] = stem

        def build(drop_path: float) -> MultiCropNet:
            backbone = create_backbone(arch, drop_path_rate=drop_path, **self.backbone_kwargs)
            head = DINOHead(
                backbone.num_features, out_dim, head_hidden_dim, head_bottleneck_dim,
                head_nlayers, head_use_bn, norm_last_layer,
            )
            return MultiCropNet(backbone, head)

        self.student = build(drop_path_rate)
        if self.student.backbone.cls_token is not None:  # the reference's init; timm's is N(0, 1e-6)
            trunc_normal_(self.student.backbone.cls_token, std=0.02)
        self.teacher = build(0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        configure_blocks(self.student.backbone, compile_blocks, grad_checkpointing)
        configure_blocks(self.teacher.backbone, compile_blocks)
        self.compile_augment = compile_augment
        self.augment: Optional[nn.Module] = None  # set in setup() from the train transform
        self.loss = DINOLoss(out_dim, center_momentum)

        self.student_temp = student_temp
        self.warmup_teacher_temp, self.teacher_temp = warmup_teacher_temp, teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_per_step = teacher_temp_per_step
        self.momentum_teacher, self.momentum_teacher_final = momentum_teacher, momentum_teacher_final
        self.freeze_last_layer = freeze_last_layer
        self.clip_grad = clip_grad
        self.bottleneck_koleo_weight = bottleneck_koleo_weight
        self.momentum_schedule: Optional[Tensor] = None
        self.teacher_temp_schedule: Optional[Tensor] = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        transform = getattr(datamodule, "train_transform", None)
        # seeded from the process's seed (seed_everything), so runs are reproducible
        self.augment = device_augment_for(transform, seed=torch.initial_seed() % 2**31, compile=self.compile_augment)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Device-side augmentation of uint8 view batches (``MultiCropCrops``; the normalisation only for
        ``MultiCropTransform(uint8_views=True)``); others pass through."""
        if self._trainer is not None and self.trainer.training:
            batch = augment_batch(batch, self.augment)
        return batch

    # -- optimisation ----------------------------------------------------------------------------
    def optimizer_param_groups(self) -> List[Dict]:
        """The student only (backbone + head); the teacher is never optimised."""
        return param_groups(self.student.named_parameters(), self.weight_decay, exempt_tokens=self.wd_exempt_tokens)

    BACKBONES = {"teacher": "teacher.backbone", "student": "student.backbone"}
    EVAL_BACKBONE = "teacher"
    warmup_reaches_base = True  # the reference cosine_scheduler's warm-up: linspace(0, peak, W)

    def build_schedules(self) -> None:
        """lr / wd (base class), EMA momentum (cosine to ``momentum_teacher_final``, 1 by default) per
        step; the teacher temperature per epoch (the reference's ``teacher_temp_schedule[epoch]``), or
        per step with ``teacher_temp_per_step``."""
        super().build_schedules()
        total = self.total_steps
        self.momentum_schedule = cosine_schedule(self.momentum_teacher, self.momentum_teacher_final, total)
        if self.teacher_temp_per_step:
            ramp = round(self.warmup_teacher_temp_epochs * self.steps_per_epoch)
            self.teacher_temp_schedule = linear_then_constant(self.warmup_teacher_temp, self.teacher_temp, ramp, total)
        else:
            ramp = int(self.warmup_teacher_temp_epochs)
            self.teacher_temp_schedule = linear_then_constant(self.warmup_teacher_temp, self.teacher_temp, ramp, ramp + 1)

    def current_teacher_temp(self) -> float:
        """This step's teacher temperature (indexed by the step, or by the epoch as the reference)."""
        index = self.global_step if self.teacher_temp_per_step else self.current_epoch
        return at(self.teacher_temp_schedule, index)

    def _mean_over_processes(self, t: Tensor) -> Tensor:
        """Mean over all processes with no host sync (``all_gather``: ``strategy.reduce`` adds a
        barrier). Identity on a single process. ``[1, K] -> [1, K]``."""
        if self._trainer is None or self.trainer.world_size == 1:
            return t
        return self.all_gather(t).mean(dim=0)  # [W, 1, K] -> [1, K]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        crops, _ = batch
        if not isinstance(crops, (list, tuple)) or len(crops) < NUM_GLOBAL_CROPS:
            raise ValueError(
                "DINO needs batches of (list of crops, labels) with at least 2 crops (2 global first): "
                "use ssl_vit.data.multicrop.MultiCropTransform as the train transform; got "
                f"{type(crops).__name__}" + (f" of {len(crops)}" if isinstance(crops, (list, tuple)) else "")
            )
        teacher_temp = self.current_teacher_temp()
        momentum = at(self.momentum_schedule, self.global_step)
        with torch.no_grad():
            teacher_out = self.teacher(crops[:NUM_GLOBAL_CROPS])  # [2 * B, K]
        # the KoLeo term needs a nearest neighbour: two images at least
        koleo_on = self.bottleneck_koleo_weight > 0 and crops[0].shape[0] > 1
        if koleo_on:
            student_out, bottleneck = self.student(crops, return_bottleneck=True)  # [V * B, K], [V * B, d]
        else:
            student_out = self.student(crops)  # [V * B, K]
        stats = teacher_stats(teacher_out, self.loss.center, teacher_temp)
        loss = self.loss(
            student_out, teacher_out, len(crops), teacher_temp, self.student_temp,
            center_reduce=self._mean_over_processes,
        )
        if koleo_on:
            global_crops = bottleneck[: NUM_GLOBAL_CROPS * crops[0].shape[0]].chunk(NUM_GLOBAL_CROPS)
            koleo = sum(koleo_loss(z) for z in global_crops) / NUM_GLOBAL_CROPS
            self.log("train/bottleneck_koleo", koleo, on_step=True, on_epoch=False, batch_size=1)
            loss = loss + self.bottleneck_koleo_weight * koleo
        self.log("train/loss", loss, prog_bar=True, batch_size=crops[0].shape[0])
        self.log_dict(
            {
                "train/momentum": momentum,
                "train/teacher_temp": teacher_temp,
                "train/teacher_entropy": stats["entropy"],
                "train/teacher_kl_to_centre": stats["kl_to_centre"],
            },
            on_step=True, on_epoch=False, batch_size=1,
        )
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Per-tensor clipping of the student's gradients, then the last-layer freeze (gradients are
        unscaled here under AMP)."""
        if self.clip_grad > 0:
            grads = [p.grad for p in self.student.parameters() if p.grad is not None]
            clip_grad_per_tensor_(grads, self.clip_grad)
        if self.current_epoch < self.freeze_last_layer:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: Optional[float] = None,
        gradient_clip_algorithm: Optional[str] = None,
    ) -> None:
        """DINO clips in ``on_before_optimizer_step`` (``clip_grad``); a trainer-level clip would
        clip a second time, so it is refused."""
        if gradient_clip_val:
            raise ValueError(
                f"DINO clips gradients itself (model.clip_grad={self.clip_grad}); leave "
                f"trainer.gradient_clip_val unset (got {gradient_clip_val})"
            )

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimiser step, then the teacher EMA with this step's momentum (``global_step`` is
        incremented only after this hook returns)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.update_teacher(at(self.momentum_schedule, self.global_step))

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher <- momentum * teacher + (1 - momentum) * student`` for every parameter, with
        foreach kernels (buffers are not averaged, as in the reference).

        During training, on a step ``ssl_vit.training.NonFiniteGuard`` skipped (``step_skipped``), the
        momentum is 1 (the teacher holds still), chosen on the device: ``m = where(bad, 1, momentum)``, no host sync.
        """
        teacher = list(self.teacher.parameters())
        student = [p.detach() for p in self.student.parameters()]
        bad = self.step_skipped
        if bad is None:  # no NonFiniteGuard, or outside training
            torch._foreach_mul_(teacher, momentum)
            torch._foreach_add_(teacher, student, alpha=1.0 - momentum)
            return
        keep = torch.where(bad, 1.0, momentum)  # float32 [] on the device
        torch._foreach_mul_(teacher, keep)
        torch._foreach_add_(teacher, torch._foreach_mul(student, torch.where(bad, 0.0, 1.0 - momentum)))

    # -- inference and checkpoints ---------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """Teacher backbone features (what DINO evaluates): ``[B, C, H, W] -> [B, D]``."""
        return self.teacher.backbone(images)

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = stage_metadata(self, "dino", self.arch, self.backbone_kwargs)
