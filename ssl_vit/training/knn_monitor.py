"""k-NN accuracy of the backbone being pretrained, every few epochs (a monitor: it changes nothing).

    data:
      class_path: ssl_vit.data.ShardDataModule
      init_args:
        train: data/train-{000000..000009}.tar        # what the run trains on (labels not needed)
        eval_train: data/train-{000000..000009}.tar   # the k-NN bank: labelled, evaluation transform
        val: data/val-{000000..000001}.tar            # the queries
    trainer:
      callbacks:
        - class_path: ssl_vit.training.knn_monitor.KNNMonitor
          init_args: {every_n_epochs: 10}

The bank and the queries come from the run's DataModule (``eval_train_dataloader()`` and
``val_dataloader()``, both read with its evaluation transform), so ``--data.eval_train`` and
``--data.val`` point the monitor at other data; ``train_loader`` and ``val_loader`` give loaders
directly (in Python). The backbone is found on the LightningModule: ``backbone="auto"`` takes the one
the stage declares for evaluation (DINO's teacher, MAE's encoder, a probe's backbone); a dotted
attribute path or a function of the module picks another. Logs ``val/knn_top1`` and ``val/knn_top5``
(fractions, at the end of a training epoch), the names the k-NN stage logs.
"""
from typing import Any, Callable, Optional, Union

import pytorch_lightning as pl
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ssl_vit.checkpoints.format import find_backbone
from ssl_vit.eval.distributed import gather_rows, split_for_rank
from ssl_vit.eval.features import Feature, check_feature, extract_features, vit_features
from ssl_vit.eval.knn import KNN_TOP1, KNN_TOP5, knn_classify
from ssl_vit.models.rel_pos import BACKBONE_TYPES


def monitored_vit(pl_module: pl.LightningModule, backbone: Union[str, Callable[[pl.LightningModule], Any]]) -> VisionTransformer:
    """The ViT the monitor reads (``ssl_vit.checkpoints.format.find_backbone``), checked to be a timm ViT."""
    model = find_backbone(pl_module, backbone)
    if not isinstance(model, BACKBONE_TYPES):
        raise TypeError(f"k-NN monitor expected a timm VisionTransformer (or Eva, VisionTransformerRelPos), got {type(model).__name__}")
    return model


class KNNMonitor(pl.Callback):
    """Weighted k-NN top-1 / top-5 of the model's backbone on a labelled held-out set.

    Args:
        train_loader: bank ``(images, labels)`` dataloader, with ``val_loader`` (default: the run's
            DataModule, see the module docstring).
        val_loader: query dataloader.
        every_n_epochs: run after every that many training epochs.
        k: neighbours.
        temperature: vote temperature.
        backbone: ``"auto"``, a dotted attribute path (``"teacher.backbone"``, ``"encoder.vit"``) or
            a function ``pl_module -> VisionTransformer``.
        feature: ``"cls"``, ``"avg"``, ``"cls_avg"`` or ``"gap"`` (``ssl_vit.eval.features.vit_features``).
        bank_on_cpu: keep the bank in host memory (moved to the accelerator in chunks).
        chunk_size: queries per similarity chunk.
    """

    def __init__(
        self,
        train_loader: Optional[Any] = None,
        val_loader: Optional[Any] = None,
        every_n_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        backbone: Union[str, Callable[[pl.LightningModule], Any]] = "auto",
        feature: Feature = "cls",
        bank_on_cpu: bool = False,
        chunk_size: int = 4096,
    ) -> None:
        super().__init__()
        if (train_loader is None) != (val_loader is None):
            raise ValueError("KNNMonitor needs both `train_loader` and `val_loader`, or neither (then it reads the "
                             "run's DataModule)")
        if every_n_epochs < 1 or k < 1 or temperature <= 0:
            raise ValueError(f"KNNMonitor needs every_n_epochs >= 1, k >= 1, temperature > 0 (got {every_n_epochs}, {k}, {temperature})")
        self.train_loader, self.val_loader = train_loader, val_loader
        self.every_n_epochs, self.k, self.temperature = every_n_epochs, k, temperature
        self.backbone, self.feature, self.bank_on_cpu, self.chunk_size = backbone, feature, bank_on_cpu, chunk_size
        self.last: Optional[dict] = None  # the latest {KNN_TOP1: ..., KNN_TOP5: ...}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.train_loader is None:
            self._datamodule(trainer).setup(stage)  # the splits exist and their classes agree, before any compute
        check_feature(monitored_vit(pl_module, self.backbone), self.feature, 1)

    @staticmethod
    def _datamodule(trainer: pl.Trainer) -> Any:
        """The run's DataModule, checked to have the bank (``eval_train``) and the queries (``val``)."""
        data = trainer.datamodule
        missing = [f"--data.{s}" for s in ("eval_train", "val") if getattr(data, s, None) is None]
        if data is None or not hasattr(data, "eval_train_dataloader") or missing:
            raise ValueError(f"KNNMonitor reads its bank and queries from the run's DataModule: give "
                             f"{' and '.join(missing) or 'an ssl_vit DataModule'} (labelled images; eval_train is "
                             "often the training data again)")
        if not data.classes_of("eval_train"):
            raise ValueError(f"KNNMonitor: the eval_train data ({data.eval_train}) has no labels; the k-NN bank needs "
                             "labelled images")
        return data

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.last = self.evaluate(trainer, pl_module)
            pl_module.log_dict(self.last, on_epoch=True, batch_size=1)

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        """Embed the bank and the queries with the current backbone and return k-NN top-1 / top-5 (fractions)."""
        model = monitored_vit(pl_module, self.backbone)
        if self.train_loader is None:
            data = self._datamodule(trainer)
            train_loader, val_loader = data.eval_train_dataloader(), data.val_dataloader()
        else:
            train_loader, val_loader, data = self.train_loader, self.val_loader, None
        rank, world = trainer.global_rank, trainer.world_size
        device = pl_module.device

        def features(images: Tensor) -> Tensor:
            return vit_features(model, images, self.feature)

        was_training = model.training
        model.eval()
        try:
            bank_device = torch.device("cpu") if self.bank_on_cpu else device
            bar = trainer.is_global_zero and trainer.progress_bar_callback is not None
            bank, bank_labels = extract_features(features, split_for_rank(train_loader, rank, world), device, bank_device,
                                                 progress="k-NN monitor: bank" if bar else None)
            queries, labels = extract_features(features, split_for_rank(val_loader, rank, world), device, device,
                                               progress="k-NN monitor: queries" if bar else None)
        finally:
            model.train(was_training)
        bank = gather_rows(bank, pl_module.all_gather, world, device)
        bank_labels = gather_rows(bank_labels, pl_module.all_gather, world, device)
        num_classes = int(bank_labels.max()) + 1 if data is None else len(data.classes_of("eval_train"))
        scores = knn_classify(bank, bank_labels, queries, num_classes, self.k, self.temperature, self.chunk_size)
        top5 = scores.topk(min(5, num_classes), dim=1).indices
        correct = torch.stack([(top5[:, 0] == labels).sum(), (top5 == labels[:, None]).any(1).sum()]).float()
        total = torch.tensor(float(len(labels)), device=device)
        correct = trainer.strategy.reduce(correct, reduce_op="sum")
        total = trainer.strategy.reduce(total, reduce_op="sum")
        return {KNN_TOP1: float(correct[0] / total), KNN_TOP5: float(correct[1] / total)}
