"""What the linear probe and finetuning share: a backbone (``self.backbone``) with a classifier head
whose class count may come from the datamodule at setup, top-1 / top-5 validation, and the
checkpoint metadata that lets ``load_backbone`` read the backbone back.
"""
from typing import Any, Dict, Optional, Tuple

import pytorch_lightning as pl
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ssl_vit.checkpoints.format import CHECKPOINT_KEY, stage_metadata
from ssl_vit.methods.base import ScheduledModule


class ClassifierModule(ScheduledModule):
    """Base of :class:`~ssl_vit.methods.probe.LinearProbe` and :class:`~ssl_vit.methods.finetune.Finetune`.

    Subclasses set ``self.backbone``, ``self.backbone_arch``, ``self.backbone_kwargs``, call
    :meth:`init_head` in ``__init__``, and implement :meth:`make_head` and :meth:`features`.
    """

    stage = "classifier"  # the method name written into checkpoints
    BACKBONES = {"backbone": "backbone"}
    EVAL_BACKBONE = "backbone"

    def init_head(self, num_classes: Optional[int]) -> None:
        """Build the head now if the class count is known, else at setup."""
        self.num_classes = num_classes
        self.head: Optional[nn.Module] = None if num_classes is None else self.make_head(num_classes)
        self.top1: Optional[MulticlassAccuracy] = None
        self.top5: Optional[MulticlassAccuracy] = None

    def make_head(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def features(self, x: Tensor) -> Tensor:
        """Input batch -> features ``[B, F]`` the head reads."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        super().setup(stage)
        num_classes = resolve_num_classes(self.num_classes, self.trainer)
        if self.head is None:
            self.head = self.make_head(num_classes)
        self.num_classes = num_classes
        self.hparams["num_classes"] = num_classes  # so that load_from_checkpoint builds the head
        self.top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")

    def forward(self, x: Tensor) -> Tensor:
        """Inputs -> logits ``[B, num_classes]``."""
        if self.head is None:
            raise RuntimeError(f"the {self.stage} head is built at setup (num_classes from the datamodule) or from num_classes")
        return self.head(self.features(x))

    def check_labels(self, labels: Tensor, batch_idx: int) -> None:
        """Labels of -1 (unknown) cannot train or score a classifier; checked on the first batch."""
        if batch_idx == 0 and bool((labels < 0).any()):
            raise ValueError(f"the {self.stage} stage needs labelled data: this batch has label -1 (unknown)")

    def validation_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, labels = batch
        self.check_labels(labels, batch_idx)
        logits = self(x)
        self.top1(logits, labels)
        self.top5(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), on_epoch=True, batch_size=len(labels), sync_dist=True)
        self.log_dict({"val/top1": self.top1, "val/top5": self.top5}, on_epoch=True, prog_bar=True, batch_size=len(labels))

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = stage_metadata(self, self.stage, self.backbone_arch, self.backbone_kwargs)


def resolve_num_classes(num_classes: Optional[int], trainer: "pl.Trainer") -> int:
    """``num_classes`` checked against the datamodule's (or taken from it when None)."""
    found = getattr(getattr(trainer, "datamodule", None), "num_classes", None)
    if num_classes is None:
        if not found:
            raise ValueError("num_classes is not given and the datamodule does not say it (datamodule.num_classes)")
        return int(found)
    if found and int(found) != num_classes:
        raise ValueError(f"num_classes={num_classes} is given, but the datamodule has {found} classes")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return num_classes
