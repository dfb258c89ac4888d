"""Watch the heads spread out: mean attention distance per head and layer during training.

Every few epochs, :class:`AttentionDistanceLogger` measures the mean attention distance and entropy
of every head (``ssl_vit.viz.attention_distance``) on a fixed set of images and writes
``<trainer.log_dir or default_root_dir>/attention_distance/epoch_XXX/`` (``attention_distance.json``,
``attention_distance.png``, ``attention_entropy.png``); to every ``WandbLogger`` it logs the two
plots as ``attention_distance`` and the mean distance of each layer as scalars. Only global rank 0
measures. Add it to a recipe's callbacks::

    - class_path: ssl_vit.viz.attention_distance_logger.AttentionDistanceLogger
      init_args: {every_n_epochs: 10, num_images: 32, image_size: 224}
"""
import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import WandbLogger

from ssl_vit.checkpoints.format import find_backbone
from ssl_vit.models.backbone import patch_size
from ssl_vit.viz.attention_distance import load_images, measure_attention_distance, plot_attention_distance
from ssl_vit.viz.attention_logger import run_images
from ssl_vit.viz.images import MAX_TOKENS
from ssl_vit.viz.periodic import due_run_dir, image_inputs


class AttentionDistanceLogger(pl.Callback):
    """Every ``every_n_epochs`` training epochs, measure how far each head attends on fixed images.

    Args:
        images: image files, folders or shard patterns; default: the first ``num_images`` of the
            run's own val (else train) data.
        num_images: images used (the first ones found).
        every_n_epochs: measure after every this many training epochs.
        image_size: shorter side the images are resized to (then center-cropped to patch multiples).
        backbone: which backbone of the LightningModule (``ssl_vit.checkpoints.format.find_backbone``;
            default: the stage's evaluation backbone, DINO's teacher or MAE's encoder).
        batch_size: images per forward.
    """

    def __init__(
        self,
        images: Optional[Union[str, List[str]]] = None,
        num_images: int = 16,
        every_n_epochs: int = 1,
        image_size: int = 224,
        backbone: Optional[str] = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        for name, value in (("num_images", num_images), ("every_n_epochs", every_n_epochs),
                            ("image_size", image_size), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"AttentionDistanceLogger: {name} must be >= 1, got {value}")
        self.inputs: Sequence[str] = image_inputs(images, "AttentionDistanceLogger")
        self.num_images, self.every_n_epochs, self.image_size = num_images, every_n_epochs, image_size
        self.backbone, self.batch_size = backbone, batch_size
        self._images: List[torch.Tensor] = []  # uint8 [3, H, W]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._images:
            return
        patch = patch_size(find_backbone(pl_module, self.backbone))
        inputs = list(self.inputs) or [run_images(trainer)]
        loaded, skipped = load_images(inputs, self.image_size, patch, limit=self.num_images, max_tokens=MAX_TOKENS)
        if skipped and self.inputs:  # the run's own folders may hold other files (the shards' JSON)
            raise ValueError("AttentionDistanceLogger: cannot use "
                             + ", ".join(f"{s['path']} ({s['reason']})" for s in skipped))
        if not loaded:
            raise ValueError(f"AttentionDistanceLogger: no images in {inputs}")
        self._images = [tensor for _, tensor in loaded]

    def measure(self, pl_module: pl.LightningModule, output: Path) -> Tuple[List[Path], List[float]]:
        """Write the JSON and plots to ``output``; return the plots and the mean distance per layer."""
        result = measure_attention_distance(find_backbone(pl_module, self.backbone), self._images, self.batch_size)
        output.mkdir(parents=True, exist_ok=True)
        (output / "attention_distance.json").write_text(json.dumps(result.to_json(), indent=1))
        return plot_attention_distance(result, output, title=output.name), result.distance.mean(dim=1).tolist()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_dir = due_run_dir(trainer, self.every_n_epochs)
        if run_dir is None:
            return
        if not self._images:
            raise RuntimeError("AttentionDistanceLogger has no images: setup(stage='fit') did not run")
        plots, per_layer = self.measure(pl_module, run_dir / "attention_distance" / f"epoch_{trainer.current_epoch:03d}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="attention_distance", images=[np.asarray(Image.open(p)) for p in plots],
                                 caption=[p.stem for p in plots], step=trainer.global_step)
                logger.log_metrics({f"attention_distance/layer_{i}": d for i, d in enumerate(per_layer)},
                                   step=trainer.global_step)
