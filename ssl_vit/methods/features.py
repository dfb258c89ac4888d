"""The ``ssl-vit predict`` stage: frozen-backbone features of every image of the run's data.

    ssl-vit predict --config predict/features --ckpt_path runs/dino/checkpoints/last.ckpt \\
        --data.train "shards/train-{000000..000009}.tar" [--model.features [cls,avg]]

The backbone is read from any file ``ssl_vit.load_backbone`` reads (``--ckpt_path`` is routed to
``--model.weights`` by the CLI); ``predict_step`` returns the features, labels and sample keys of a
batch, and :class:`ssl_vit.training.feature_writer.FeatureWriter` writes them to disk.
"""
from typing import Any, Dict, List, Optional, Sequence

import pytorch_lightning as pl
from torch import Tensor

from ssl_vit.checkpoints.load import build_frozen_backbone
from ssl_vit.eval.features import Feature, check_feature, vit_features


class FeatureExtractor(pl.LightningModule):
    """Features of a frozen ViT for ``trainer.predict``.

    Args:
        weights: any file ``load_backbone`` reads; ``None`` for a random backbone (a baseline).
        arch: architecture, for files that do not name it or for a random backbone.
        role: backbone of a multi-backbone file (DINO ``teacher``, the default, or ``student``).
        backbone_kwargs: ``create_backbone`` kwargs (``img_size`` resamples the position embedding).
        features: which features to write, each ``"cls"``, ``"avg"``, ``"cls_avg"`` or ``"gap"``
            (:func:`ssl_vit.eval.features.vit_features`).
        n_last_blocks: the ``"cls"`` feature concatenates the CLS tokens of this many last blocks.
    """

    def __init__(
        self,
        weights: Optional[str] = None,
        arch: Optional[str] = None,
        role: Optional[str] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        features: Sequence[Feature] = ("cls",),
        n_last_blocks: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features: List[str] = list(features)
        if not self.features or len(set(self.features)) != len(self.features):
            raise ValueError(f"features must name each feature once, got {self.features}")
        self.backbone, self.backbone_arch, self.backbone_kwargs = build_frozen_backbone(weights, arch, role, backbone_kwargs)
        for feature in self.features:
            check_feature(self.backbone, feature, n_last_blocks if feature == "cls" else 1)
        self.n_last_blocks = n_last_blocks

    def train(self, mode: bool = True) -> "FeatureExtractor":
        super().train(mode)
        self.backbone.eval()
        return self

    def predict_step(self, batch: Sequence[Any], batch_idx: int, dataloader_idx: int = 0) -> Dict[str, Any]:
        """``{feature: [B, F] float32, "labels": [B] int64, "keys": [B] str}`` (keys when the loader gives them)."""
        images, labels = batch[0], batch[1]
        if not isinstance(images, Tensor):
            raise TypeError(f"predict needs image tensors [B, C, H, W], got {type(images).__name__} (multi-crop views? "
                            "the predict loaders use the DataModule's val_transform)")
        out: Dict[str, Any] = {
            name: vit_features(self.backbone, images, name, self.n_last_blocks if name == "cls" else 1).float()
            for name in self.features
        }
        out["labels"] = labels.long()
        out["keys"] = list(batch[2]) if len(batch) > 2 else [f"rank{self.global_rank}/{batch_idx}/{i}" for i in range(len(labels))]
        return out
