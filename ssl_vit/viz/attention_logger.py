"""Watch segmentation emerge: the self-attention gallery of a fixed set of images, every few epochs.

Writes ``<trainer.log_dir or default_root_dir>/attention/epoch_XXX/`` with the same writer as
``tools/export_attention.py`` (``index.html``, one folder per image) and logs one picture per image
(top row: image + heat map per head + head mean; bottom row: image + mask overlays) to every
``WandbLogger`` as ``attention``. Only global rank 0 renders.
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from ssl_vit.checkpoints.format import find_backbone
from ssl_vit.models.backbone import patch_size
from ssl_vit.viz.gallery import export_batch, render_columns, shared_scale
from ssl_vit.viz.images import MAX_TOKENS, TooManyPatches, collect_images, prepare_image
from ssl_vit.viz.page import GalleryEntry, write_index
from ssl_vit.viz.periodic import due_run_dir, image_inputs


def mosaic(image: np.ndarray, rendered: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Two rows ``[2H, (1 + columns) W, 3]``: image + heat maps over image + overlays."""
    heat = np.concatenate([image] + [r[0] for r in rendered.values()], axis=1)
    over = np.concatenate([image] + [r[2] for r in rendered.values()], axis=1)
    return np.concatenate([heat, over], axis=0)


def run_images(trainer: pl.Trainer) -> str:
    """The images of the run: its DataModule's ``val`` split, else its ``train`` split.

    Raises:
        ValueError: the run has no DataModule naming either.
    """
    data = trainer.datamodule
    found = getattr(data, "val", None) or getattr(data, "train", None)
    if not isinstance(found, (str, Path)):
        raise ValueError("AttentionGalleryLogger: give it `images`, or run it with a DataModule whose val or train "
                         "data is a folder or shard pattern")
    return str(found)


class AttentionGalleryLogger(pl.Callback):
    """Every ``every_n_epochs`` training epochs, export the attention maps of fixed images.

    Args:
        images: image files, folders or shard patterns (as for ``ssl-vit attention``); they are read
            once, at the start of ``fit``; any unreadable input is an error. Default: the first
            ``num_images`` images of the run's ``--data.val`` (else ``--data.train``), so a recipe
            names no path of its own.
        num_images: how many images of the run's data, when ``images`` is not given.
        every_n_epochs: render after every ``every_n_epochs``-th training epoch.
        image_size: shorter side after resizing (then center-cropped to patch multiples).
        backbone: dotted attribute path of the ViT in the LightningModule; by default
            the one the stage declares for evaluation (DINO's teacher, MAE's encoder, a probe's backbone).
        threshold: fraction of attention mass the masks keep.
        layer: block whose attention is shown (-1: last).
        rollout: add an attention-rollout column.
        max_tokens: refuse (at the start of ``fit``) an image whose crop holds more patches than
            this (``None``: no bound); the captured attention grows as its square.
    """

    def __init__(
        self,
        images: Optional[Union[str, List[str]]] = None,
        num_images: int = 8,
        every_n_epochs: int = 1,
        image_size: int = 224,
        backbone: Optional[str] = None,
        threshold: float = 0.6,
        layer: int = -1,
        rollout: bool = False,
        max_tokens: Optional[int] = MAX_TOKENS,
    ) -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.inputs: Sequence[str] = image_inputs(images, "AttentionGalleryLogger")
        self.num_images = num_images
        self.every_n_epochs, self.image_size, self.backbone = every_n_epochs, image_size, backbone
        self.threshold, self.layer, self.rollout, self.max_tokens = threshold, layer, rollout, max_tokens
        self._images: List[Tuple[str, torch.Tensor]] = []  # (name, uint8 [3, H, W])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._images:
            return
        model = find_backbone(pl_module, self.backbone)
        patch = patch_size(model)
        if self.inputs:
            sources, skipped = collect_images(self.inputs)
        else:  # the run's own images; files of other kinds beside them (the shards' JSON) are passed over
            sources, _ = collect_images([run_images(trainer)], limit=self.num_images)
            skipped = []
        for source in sources:
            try:
                with source.open() as image:
                    self._images.append((source.name, prepare_image(image, self.image_size, patch, self.max_tokens)))
            except TooManyPatches as err:
                skipped.append({"path": source.origin, "reason": str(err)})
            except Exception as err:  # PIL raises many types for unreadable files
                skipped.append({"path": source.origin, "reason": f"unreadable image: {err}"})
        if skipped:
            raise ValueError(f"AttentionGalleryLogger: cannot use {', '.join(s['path'] + ' (' + s['reason'] + ')' for s in skipped)}")
        if not self._images:
            raise ValueError(f"AttentionGalleryLogger: no images in {list(self.inputs) or run_images(trainer)}")

    def render(self, pl_module: pl.LightningModule, output: Path) -> List[Tuple[str, np.ndarray]]:
        """Write the gallery to ``output``; return ``(name, mosaic)`` per image, in input order."""
        model = find_backbone(pl_module, self.backbone)
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for i, (_, tensor) in enumerate(self._images):
            groups.setdefault(tuple(tensor.shape), []).append(i)
        pictures: Dict[int, Tuple[str, np.ndarray]] = {}
        entries: Dict[int, GalleryEntry] = {}
        for indices in groups.values():
            names = [self._images[i][0] for i in indices]
            batch = torch.stack([self._images[i][1] for i in indices])
            results = export_batch(model, batch, names, output, self.threshold, self.layer, self.rollout)
            for i, name, (maps, masks) in zip(indices, names, results):
                image = self._images[i][1].permute(1, 2, 0).numpy()
                pictures[i] = (name, mosaic(image, render_columns(image, maps, masks)))
                entries[i] = GalleryEntry(name, list(maps), scale=shared_scale(maps))
        write_index(output, [entries[i] for i in sorted(entries)], output.name,
                    f"layer {self.layer}, masks keep {self.threshold:.0%} of the attention mass")
        return [pictures[i] for i in sorted(pictures)]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_dir = due_run_dir(trainer, self.every_n_epochs)
        if run_dir is None:
            return
        if not self._images:
            raise RuntimeError("AttentionGalleryLogger has no images: setup(stage='fit') did not run")
        output = run_dir / "attention" / f"epoch_{trainer.current_epoch:03d}"
        pictures = self.render(pl_module, output)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key="attention", images=[p for _, p in pictures], caption=[n for n, _ in pictures],
                    step=trainer.global_step,
                )
