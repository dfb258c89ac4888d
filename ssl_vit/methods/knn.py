"""The ``ssl-vit validate`` k-NN stage: train-set features once, then ``val/knn_top1`` (the DINO
protocol). The maths is in ``ssl_vit.eval``; the k-NN monitor callback
(``ssl_vit.training.knn_monitor.KNNMonitor``) uses the same functions, and logs the same names, during
pretraining.
"""
from typing import Any, Dict, Optional, Tuple

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from ssl_vit.checkpoints.format import CHECKPOINT_KEY, stage_metadata
from ssl_vit.checkpoints.load import build_frozen_backbone
from ssl_vit.eval.distributed import gather_rows, split_for_rank
from ssl_vit.eval.features import Feature, check_feature, extract_features, vit_features
from ssl_vit.eval.knn import KNN_TOP1, KNN_TOP5, knn_classify
from ssl_vit.methods.classifier import resolve_num_classes
from ssl_vit.methods.options import check_options


class KNNEval(pl.LightningModule):
    """k-NN evaluation of a frozen backbone: ``ssl-vit validate --config recipes/probe/knn_*.yaml``.

    At the start of validation the train split (``trainer.datamodule.train_dataloader()``; give it
    the evaluation transform) is embedded once and gathered from every rank; each validation batch
    is then classified against it. Logs ``val/knn_top1`` and ``val/knn_top5``.

    Args:
        weights: any file ``load_backbone`` reads; ``None`` for a random backbone (a baseline).
        arch: architecture, for files that do not name it or for a random backbone.
        role: backbone role (DINO ``teacher`` / ``student``).
        backbone_kwargs: ``create_backbone`` kwargs (``img_size`` resamples the position embedding).
        num_classes: classes; from the datamodule when None (a mismatch is an error).
        k: neighbours.
        temperature: vote temperature.
        feature: ``"cls"``, ``"avg"`` or ``"cls_avg"`` (see :func:`vit_features`).
        chunk_size: queries per similarity chunk.
        bank_on_cpu: keep the train-feature bank in host memory (moved to the accelerator in chunks)
            for banks larger than accelerator memory.
    """

    BACKBONES = {"backbone": "backbone"}
    EVAL_BACKBONE = "backbone"

    def __init__(
        self,
        weights: Optional[str] = None,
        arch: Optional[str] = None,
        role: Optional[str] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        num_classes: Optional[int] = None,
        k: int = 20,
        temperature: float = 0.07,
        feature: Feature = "cls",
        chunk_size: int = 4096,
        bank_on_cpu: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_options("KNNEval", self.hparams, dict(k="[1, inf)", temperature="(0, inf)", chunk_size="[1, inf)"))
        self.backbone, self.backbone_arch, self.backbone_kwargs = build_frozen_backbone(weights, arch, role, backbone_kwargs)
        check_feature(self.backbone, feature, 1)
        self.k, self.temperature, self.feature, self.chunk_size = k, temperature, feature, chunk_size
        self.bank_on_cpu = bank_on_cpu
        self.num_classes = num_classes
        self.bank: Optional[Tuple[Tensor, Tensor]] = None
        self.top1: Optional[MulticlassAccuracy] = None
        self.top5: Optional[MulticlassAccuracy] = None

    def setup(self, stage: str) -> None:
        self.num_classes = resolve_num_classes(self.num_classes, self.trainer)
        self.hparams["num_classes"] = self.num_classes
        self.top1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(self.num_classes, top_k=min(5, self.num_classes), average="micro")

    def features(self, images: Tensor) -> Tensor:
        return vit_features(self.backbone, images, self.feature)  # [B, F]

    def train(self, mode: bool = True) -> "KNNEval":
        super().train(mode)
        self.backbone.eval()
        return self

    def on_validation_start(self) -> None:
        trainer = self.trainer
        if trainer.datamodule is None:
            raise ValueError("KNNEval needs a datamodule: the bank is its train split")
        loader = split_for_rank(trainer.datamodule.train_dataloader(), trainer.global_rank, trainer.world_size)
        out_device = torch.device("cpu") if self.bank_on_cpu else self.device
        bar = "k-NN bank (train split)" if trainer.is_global_zero and trainer.progress_bar_callback else None
        feats, labels = extract_features(self.features, loader, self.device, out_device=out_device, progress=bar)
        feats = gather_rows(feats, self.all_gather, trainer.world_size, self.device)  # [N, F]
        labels = gather_rows(labels, self.all_gather, trainer.world_size, self.device)  # [N]
        self.bank = (feats, labels)

    def validation_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        if self.bank is None:
            raise RuntimeError("KNNEval: the feature bank is built in on_validation_start")
        scores = knn_classify(*self.bank, self.features(images), self.num_classes, self.k, self.temperature, self.chunk_size)
        self.top1(scores, labels)
        self.top5(scores, labels)
        self.log_dict({KNN_TOP1: self.top1, KNN_TOP5: self.top5}, on_epoch=True, batch_size=len(labels))

    def on_validation_end(self) -> None:
        self.bank = None

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = stage_metadata(self, "knn", self.backbone_arch, self.backbone_kwargs)
