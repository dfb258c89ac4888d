"""End-to-end finetuning (He et al., MAE, Sec. A.3), and supervised training from scratch.

Layer-wise lr decay (``timm.optim.param_groups_layer_decay``: block ``i`` of ``depth`` gets
``layer_decay ** (depth - i)``, the embeddings ``layer_decay ** (depth + 1)``, the head and final norm
1), scaled per step by ``ScheduledModule`` through each group's ``lr_scale``; AdamW (0.9, 0.999),
weight decay 0.05, warm-up then cosine, base lr 5e-4 x batch / 256; drop path; mixup 0.8 / cutmix 1.0
with label smoothing 0.1 (``timm.data.Mixup`` + ``SoftTargetCrossEntropy``); global average pooling.
Augmentation is the datamodule's: :class:`FinetuneTransform` (RandAugment ``rand-m9-mstd0.5-inc1``,
random erasing 0.25, bicubic). ``weights=None`` trains from scratch.
"""
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn
from torchvision.transforms.functional import to_pil_image

from ssl_vit.checkpoints.load import build_backbone
from ssl_vit.methods.base import param_groups
from ssl_vit.methods.classifier import ClassifierModule
from ssl_vit.methods.options import check_options


class FinetuneTransform:
    """The MAE finetuning augmentation, from ``timm.data.create_transform(is_training=True)``:
    random resized crop (bicubic), flip, RandAugment, normalise, random erasing.

    Args:
        size: output side.
        auto_augment: timm auto-augment policy (``None`` to disable).
        re_prob: random erasing probability.
        re_mode: random erasing fill (``"pixel"``: per-pixel normal noise).
        re_count: erased boxes.
        scale: random resized crop area range.
        hflip: horizontal flip probability.
        color_jitter: colour jitter strength, only used without ``auto_augment`` (MAE: none).
        interpolation: resize interpolation.
        mean: normalisation mean (RGB).
        std: normalisation std (RGB).

    Returns (``__call__``, on a PIL image or ``uint8 [C, H, W]`` tensor):
        float32 tensor ``[3, size, size]``.
    """
    def __init__(
        self,
        size: int = 224,
        auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        re_mode: str = "pixel",
        re_count: int = 1,
        scale: Sequence[float] = (0.08, 1.0),
        hflip: float = 0.5,
        color_jitter: Optional[float] = None,
        interpolation: str = "bicubic",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        options = dict(size=size, re_prob=re_prob, re_count=re_count, scale=scale, hflip=hflip, color_jitter=color_jitter,
                       mean=mean, std=std)
        check_options("FinetuneTransform", options, dict(size="[1, inf)", re_prob="[0, 1]", re_count="[0, inf)",
                                                         scale="(0, 1]", hflip="[0, 1]", color_jitter="[0, inf)", std="(0, inf)"))
        self.transform = create_transform(
            input_size=size,
            is_training=True,
            scale=tuple(scale),
            hflip=hflip,
            color_jitter=0.0 if color_jitter is None else color_jitter,
            auto_augment=auto_augment,
            interpolation=interpolation,
            re_prob=re_prob,
            re_mode=re_mode,
            re_count=re_count,
            mean=tuple(mean),
            std=tuple(std),
        )

    def __call__(self, image: Any) -> Tensor:
        if isinstance(image, Tensor):
            image = to_pil_image(image)
        return self.transform(image.convert("RGB"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


# Ranges of the finetuning options (``ssl_vit.methods.options``; the optimisation ones are the base's).
FINETUNE_RANGES = {
    "drop_path_rate": "[0, 1]", "layer_decay": "(0, 1]", "mixup": "[0, inf)", "cutmix": "[0, inf)",
    "mixup_prob": "[0, 1]", "mixup_switch_prob": "[0, 1]", "label_smoothing": "[0, 1]", "head_init_std": "[0, inf)",
}


class Finetune(ClassifierModule):
    """Finetune a pretrained backbone (or train one from scratch) with a linear classifier.

    Args:
        weights: any file ``load_backbone`` reads; ``None`` trains from scratch (needs ``arch``).
        arch: architecture, for files that do not name it or for training from scratch.
        role: backbone role of multi-backbone files (DINO ``teacher`` / ``student``).
        backbone_kwargs: more ``create_backbone`` kwargs (``img_size`` at another resolution: the
            position embedding is resampled).
        num_classes: classes; from the datamodule when None (a mismatch is an error at setup).
        global_pool: ``"avg"`` (mean patch token + ``fc_norm``, MAE's default) or ``"token"``.
        drop_path_rate: stochastic depth.
        layer_decay: layer-wise lr decay (0.65 for ViT-B, 0.75 for ViT-L/H; 1 disables it).
        mixup: mixup alpha (0 disables).
        cutmix: cutmix alpha (0 disables).
        mixup_prob: probability of mixing a batch.
        mixup_switch_prob: probability of cutmix instead of mixup when both are on.
        label_smoothing: label smoothing.
        head_init_std: std of the classifier weight init (MAE: 2e-5).
        base_lr, lr, min_lr, warmup_epochs, weight_decay, weight_decay_end, betas: ``ScheduledModule``.
    """
    stage = "finetune"

    def __init__(
        self,
        weights: Optional[str] = None,
        arch: Optional[str] = None,
        role: Optional[str] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        num_classes: Optional[int] = None,
        global_pool: Literal["avg", "token"] = "avg",
        drop_path_rate: float = 0.1,
        layer_decay: float = 0.75,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        head_init_std: float = 2e-5,
        base_lr: float = 5e-4,
        lr: Optional[float] = None,
        min_lr: float = 1e-6,
        warmup_epochs: float = 5.0,
        weight_decay: float = 0.05,
        weight_decay_end: Optional[float] = None,
        betas: Sequence[float] = (0.9, 0.999),
    ) -> None:
        super().__init__(
            base_lr=base_lr, lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs, weight_decay=weight_decay,
            weight_decay_end=weight_decay_end, betas=betas,
        )
        self.save_hyperparameters()
        check_options("Finetune", self.hparams, FINETUNE_RANGES)
        kwargs = dict(backbone_kwargs or {})
        for key in ("global_pool", "drop_path_rate"):
            if key in kwargs:
                raise ValueError(f"give {key} as Finetune's own argument, not in backbone_kwargs")
        kwargs.update(global_pool=global_pool, drop_path_rate=drop_path_rate)
        self.backbone, self.backbone_arch, self.backbone_kwargs = build_backbone(weights, arch, role, kwargs)
        self.backbone.train().requires_grad_(True)  # MAE finetunes every weight, the position embedding too
        self.layer_decay, self.head_init_std = layer_decay, head_init_std
        self.mixup_args = dict(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=mixup_switch_prob, label_smoothing=label_smoothing)
        self.label_smoothing = label_smoothing
        self.mixup_fn: Optional[Mixup] = None
        self.init_head(num_classes)

    def make_head(self, num_classes: int) -> nn.Linear:
        head = nn.Linear(self.backbone.num_features, num_classes)
        nn.init.trunc_normal_(head.weight, std=self.head_init_std)
        nn.init.zeros_(head.bias)
        return head

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.mixup_args["mixup_alpha"] > 0 or self.mixup_args["cutmix_alpha"] > 0:
            self.mixup_fn = Mixup(**self.mixup_args, num_classes=self.num_classes)

    def features(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> pooled backbone features ``[B, D]`` (trained)."""
        return self.backbone(images)

    def training_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        self.check_labels(labels, batch_idx)
        if self.mixup_fn is not None:
            if len(labels) % 2:  # timm's batch mixing pairs samples: drop the odd one out
                images, labels = images[:-1], labels[:-1]
            images, targets = self.mixup_fn(images, labels)
            loss = SoftTargetCrossEntropy()(self(images), targets)
        else:
            loss = F.cross_entropy(self(images), labels, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return loss

    def optimizer_param_groups(self) -> List[Dict]:
        """timm's layer-decay groups for the backbone (``lr_scale`` per layer; no decay on 1-D
        weights, tokens and position embedding), then the head at scale 1."""
        groups = param_groups_layer_decay(
            self.backbone,
            weight_decay=self.weight_decay,
            no_weight_decay_list=sorted(self.backbone.no_weight_decay()),
            layer_decay=self.layer_decay,
        )
        for group in groups:
            group["apply_wd"] = group["weight_decay"] > 0
        return groups + param_groups(self.head.named_parameters(), self.weight_decay)
