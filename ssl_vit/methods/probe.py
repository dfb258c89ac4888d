"""Linear probing of a frozen backbone: the MAE and the DINO protocols.

* ``protocol="mae"`` (He et al., Sec. A.2): ``BatchNorm1d(affine=False, eps=1e-6)`` then ``Linear``,
  LARS (momentum 0.9, trust coefficient 0.001 on the weight, not on the bias), base lr 0.1 x
  batch / 256, weight decay 0, 10 warm-up epochs then cosine (90 epochs, batch 16384 in the paper).
* ``protocol="dino"`` (Caron et al., ``eval_linear.py``): a plain ``Linear``, SGD momentum 0.9,
  lr 0.001 x batch / 256, weight decay 0, cosine (100 epochs).

The backbone is frozen: no gradients, and always in eval mode (``train()`` is overridden), so its
weights leave training bit-identical. Features are those of :func:`ssl_vit.eval.features.vit_features`.

Cached features: wrap the image datamodule in :class:`CachedFeatures` and the probe trains on
features extracted once instead of on images (give the wrapped datamodule the evaluation transform
for its train split too: cached features see no augmentation).
"""
from typing import Any, Dict, List, Literal, Optional, Tuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ssl_vit.checkpoints.dino import read_linear_head
from ssl_vit.checkpoints.load import build_frozen_backbone
from ssl_vit.eval.distributed import gather_rows, split_for_rank
from ssl_vit.eval.features import Feature, extract_features, feature_dim, vit_features
from ssl_vit.methods.base import param_groups
from ssl_vit.methods.classifier import ClassifierModule
from ssl_vit.methods.options import check_options

Protocol = Literal["mae", "dino"]
# Protocol defaults: base lr (for a batch of 256) and warm-up epochs.
PROTOCOL_DEFAULTS: Dict[str, Dict[str, float]] = {
    "mae": {"base_lr": 0.1, "warmup_epochs": 10.0},
    "dino": {"base_lr": 0.001, "warmup_epochs": 0.0},
}


class LinearProbe(ClassifierModule):
    """A linear classifier on a frozen backbone.

    Args:
        weights: any file ``load_backbone`` reads; ``None`` for a randomly initialised backbone
            (a baseline; needs ``arch``).
        arch: architecture, for files that do not name it or for a random backbone.
        role: backbone role of multi-backbone files (DINO ``teacher`` / ``student``).
        backbone_kwargs: ``create_backbone`` kwargs (``img_size`` to probe at another resolution:
            the position embedding is resampled).
        num_classes: classes; from the datamodule (or ``head_weights``) when None (a mismatch is an
            error at setup).
        protocol: ``"mae"`` (BatchNorm + Linear, LARS) or ``"dino"`` (Linear, SGD).
        feature: ``"cls"``, ``"avg"``, ``"cls_avg"`` (DINO ViT-B) or ``"gap"`` (MAE global pool); see ``vit_features``.
        n_last_blocks: CLS tokens of that many last blocks are concatenated (DINO: 4 for ViT-S/16).
        base_lr: lr for a global batch of 256 (protocol default when None).
        lr: absolute lr (overrides ``base_lr``).
        min_lr: final lr of the cosine.
        warmup_epochs: linear warm-up (protocol default when None).
        weight_decay: weight decay of the linear weight.
        momentum: SGD / LARS momentum.
        head_weights: a released DINO linear head (``eval_linear.py`` checkpoint, see
            ``ssl_vit.checkpoints.dino.read_linear_head``) to start from or to validate as it is; needs
            ``protocol="dino"`` and the feature layout it was trained on.
    """

    stage = "probe"

    def __init__(
        self,
        weights: Optional[str] = None,
        arch: Optional[str] = None,
        role: Optional[str] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        num_classes: Optional[int] = None,
        protocol: Protocol = "mae",
        feature: Feature = "cls",
        n_last_blocks: int = 1,
        base_lr: Optional[float] = None,
        lr: Optional[float] = None,
        min_lr: float = 0.0,
        warmup_epochs: Optional[float] = None,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        head_weights: Optional[str] = None,
    ) -> None:
        if protocol not in PROTOCOL_DEFAULTS:
            raise ValueError(f"protocol must be 'mae' or 'dino', got {protocol!r}")
        defaults = PROTOCOL_DEFAULTS[protocol]
        super().__init__(
            base_lr=defaults["base_lr"] if base_lr is None else base_lr,
            lr=lr,
            min_lr=min_lr,
            warmup_epochs=defaults["warmup_epochs"] if warmup_epochs is None else warmup_epochs,
            weight_decay=weight_decay,
        )
        self.save_hyperparameters()
        check_options("LinearProbe", self.hparams, dict(momentum="[0, 1)"))
        self.backbone, self.backbone_arch, self.backbone_kwargs = build_frozen_backbone(weights, arch, role, backbone_kwargs)
        self.protocol, self.feature, self.n_last_blocks, self.momentum = protocol, feature, n_last_blocks, momentum
        self.feature_dim = feature_dim(self.backbone, feature, n_last_blocks)
        head = None
        if head_weights is not None:
            head = read_linear_head(head_weights)
            if protocol != "dino":
                raise ValueError(f"head_weights is a DINO linear head: use protocol='dino', got {protocol!r}")
            classes, width = head["weight"].shape
            if width != self.feature_dim:
                raise ValueError(
                    f"{head_weights} reads {width}-wide features, but feature={feature!r} with "
                    f"n_last_blocks={n_last_blocks} gives {self.feature_dim}"
                )
            if num_classes is not None and num_classes != classes:
                raise ValueError(f"{head_weights} has {classes} classes, num_classes={num_classes} was given")
            num_classes = classes
        self.init_head(num_classes)
        if head is not None:
            self.head.load_state_dict(head, strict=True)

    def make_head(self, num_classes: int) -> nn.Module:
        """MAE: BatchNorm (no affine) + Linear, weight ~ trunc normal(0.01); DINO: Linear ~ N(0, 0.01)."""
        linear = nn.Linear(self.feature_dim, num_classes)
        nn.init.zeros_(linear.bias)
        if self.protocol == "mae":
            nn.init.trunc_normal_(linear.weight, std=0.01)
            return nn.Sequential(nn.BatchNorm1d(self.feature_dim, affine=False, eps=1e-6), linear)
        nn.init.normal_(linear.weight, std=0.01)
        return linear

    # -- Lightning hooks ---------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "LinearProbe":
        """Train the head; the frozen backbone stays in eval mode (no dropout, no drop path)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` -> frozen features ``[B, F]``; cached features ``[B, F]`` pass through."""
        if x.ndim == 2:
            if x.shape[1] != self.feature_dim:
                raise ValueError(f"cached features are {x.shape[1]}-wide, this probe reads {self.feature_dim}")
            return x
        with torch.no_grad():
            return vit_features(self.backbone, x, self.feature, self.n_last_blocks).float()

    def training_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, labels = batch
        self.check_labels(labels, batch_idx)
        loss = F.cross_entropy(self(x), labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return loss

    # -- optimisation ------------------------------------------------------------------------------
    def optimizer_param_groups(self) -> List[Dict]:
        """The head only (the backbone is frozen); the bias and BatchNorm are not decayed."""
        groups = param_groups(self.head.named_parameters(), self.weight_decay)
        if self.protocol == "mae":  # MAE's LARS adapts the weight, never 1-D parameters
            for group in groups:
                group["always_adapt"] = group["apply_wd"]
        return groups

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.build_schedules()
        lr = float(self.lr_schedule[0])
        if self.protocol == "mae":
            return Lars(self.optimizer_param_groups(), lr=lr, momentum=self.momentum, trust_coeff=0.001)
        return torch.optim.SGD(self.optimizer_param_groups(), lr=lr, momentum=self.momentum)


class CachedFeatures(pl.LightningDataModule):
    """A datamodule serving the frozen features of another datamodule's images, extracted once.

    The first time Lightning asks for a split's dataloader, every image of the wrapped datamodule's
    split goes once through the module's ``features`` (a :class:`LinearProbe`'s frozen backbone);
    the features, gathered from every rank, are then served as ``(features [B, F], labels [B])``
    batches for all epochs. Give the wrapped datamodule the evaluation transform for its train split:
    the cached features see no augmentation.

    Args:
        data: the image datamodule (``ShardDataModule``, ``ImageFolderDataModule``...).
        batch_size: feature batch size (the wrapped datamodule's when None).
        shuffle: shuffle the training features every epoch.
        num_workers: feature dataloader workers (features are in memory: 0 is usually right).
    """

    def __init__(
        self, data: pl.LightningDataModule, batch_size: Optional[int] = None, shuffle: bool = True, num_workers: int = 0
    ) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self._batch_size = batch_size
        self.shuffle, self.num_workers = shuffle, num_workers
        self.cache: Dict[str, TensorDataset] = {}

    @property
    def batch_size(self) -> int:
        return self._batch_size or self.data.batch_size

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def classes(self) -> List[str]:
        return getattr(self.data, "classes", [])

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str) -> None:
        self.data.trainer = self.trainer
        self.data.setup(stage)

    def features(self, split: Literal["train", "val"]) -> TensorDataset:
        """The split's features and labels, extracted on the first call."""
        if split not in self.cache:
            module = self.trainer.lightning_module
            if not callable(getattr(module, "features", None)):
                raise TypeError(f"CachedFeatures needs a module with a `features(images)` method, got {type(module).__name__}")
            trainer = self.trainer
            loader = split_for_rank(getattr(self.data, f"{split}_dataloader")(), trainer.global_rank, trainer.world_size)
            was_training = module.training
            module.eval()
            try:
                bar = f"cached features ({split})" if trainer.is_global_zero and trainer.progress_bar_callback else None
                feats, labels = extract_features(module.features, loader, module.device, progress=bar)
            finally:
                module.train(was_training)
            feats = gather_rows(feats, module.all_gather, trainer.world_size, module.device)
            labels = gather_rows(labels, module.all_gather, trainer.world_size, module.device)
            self.cache[split] = TensorDataset(feats, labels)
        return self.cache[split]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.features("train"), batch_size=self.batch_size, shuffle=self.shuffle, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.features("val"), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
