"""Log MAE reconstructions of a fixed set of images every few epochs (PNG in the run directory, and
to wandb when the run logs there)."""
from typing import Any, List, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ssl_vit.viz.periodic import due_run_dir
from ssl_vit.viz.reconstruction import labelled, mask_noise, reconstruction_grid


class ReconstructionLogger(pl.Callback):
    """Every ``every_n_epochs`` training epochs, render original | masked | reconstruction |
    reconstruction with visible patches pasted, for the same ``num_images`` images and the same mask.

    The images are the first validation images the run sees (the sanity check provides them), or,
    without validation data, the first training images; once chosen they never change. The picture is
    written to ``<trainer.log_dir or default_root_dir>/reconstructions/epoch_XXX.png`` and logged to
    every ``WandbLogger`` as ``reconstructions``.

    Args:
        every_n_epochs: render after every ``every_n_epochs``-th training epoch.
        num_images: rows of the picture.
        mask_ratio: fraction of patches hidden; the module's own ``mask_ratio`` when ``None``.
        mean, std: the normalisation of the batches, undone for display.
        seed: seed of the fixed masking noise.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 8,
        mask_ratio: Optional[float] = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if mask_ratio is not None and not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self.mask_ratio, self.mean, self.std, self.seed = mask_ratio, tuple(mean), tuple(std), seed
        self._val: List[torch.Tensor] = []
        self._train: List[torch.Tensor] = []
        self._images: Optional[torch.Tensor] = None  # the fixed set, once chosen

    # -- collecting images ------------------------------------------------------------------------
    def _collect(self, store: List[torch.Tensor], batch: Any, batch_idx: int) -> None:
        """Take images from consecutive batches of one pass over the data (a new pass that starts
        before ``num_images`` were gathered starts over, so no image is taken twice)."""
        if self._images is not None or sum(len(x) for x in store) >= self.num_images:
            return
        if batch_idx == 0:
            store.clear()
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(images, (tuple, list)):  # multi-view batch: first view
            images = images[0]
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            needed = self.num_images - sum(len(x) for x in store)
            store.append(images[:needed].detach().float().cpu())

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if dataloader_idx == 0:
            self._collect(self._val, batch, batch_idx)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._collect(self._train, batch, batch_idx)

    def fixed_images(self) -> Optional[torch.Tensor]:
        """The images every picture shows (``[N, C, H, W]``), chosen on first use."""
        if self._images is None:
            store = self._val or self._train
            if store:
                self._images = torch.cat(store)[: self.num_images]
        return self._images

    # -- rendering --------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_dir = due_run_dir(trainer, self.every_n_epochs)
        if run_dir is None:
            return
        images = self.fixed_images()
        if images is None:
            raise RuntimeError("ReconstructionLogger saw no image batches to reconstruct")
        patch = pl_module.patch_size
        noise = mask_noise(len(images), (images.shape[-2] // patch) * (images.shape[-1] // patch), self.seed)
        mask_ratio = pl_module.mask_ratio if self.mask_ratio is None else self.mask_ratio
        grid = reconstruction_grid(pl_module, images, mask_ratio, self.mean, self.std, noise)
        path = run_dir / "reconstructions" / f"epoch_{trainer.current_epoch:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture = labelled(grid)
        picture.save(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="reconstructions", images=[picture], step=trainer.global_step)
