"""What a training transform leaves to the device, and the LightningModule glue that runs it.

A transform may do part of its work where the batch lands: ``device_augment(seed, compile)`` gives
that part as a module. :class:`ssl_vit.data.gpu_augment.MultiCropCrops` leaves the colour, blur and
solarisation of DINO's views to :class:`~ssl_vit.data.gpu_augment.MultiCropGPUAugment`;
``MultiCropTransform(uint8_views=True)`` leaves only their normalisation to
:class:`~ssl_vit.data.multicrop.NormaliseViews`. Both hand the loader ``uint8`` views. A module
builds that part in ``setup`` with :func:`device_augment_for` and applies it in
``on_after_batch_transfer`` with :func:`augment_batch` (DINO does).
"""
from typing import Any, Optional

import torch
from torch import nn


def device_augment_for(transform: Any, seed: Optional[int] = None, compile: bool = False) -> Optional[nn.Module]:
    """What a training transform leaves to the device: ``transform.device_augment(seed, compile)``
    where it has one (``MultiCropCrops``: ``MultiCropGPUAugment``; ``MultiCropTransform`` with
    ``uint8_views``: ``NormaliseViews``), ``None`` where it does everything on the CPU."""
    device_augment = getattr(transform, "device_augment", None)
    return device_augment(seed, compile) if device_augment is not None else None


def augment_batch(batch: Any, augment: Optional[nn.Module]) -> Any:
    """``on_after_batch_transfer`` body: ``(views, labels)`` with uint8 views -> augmented views
    (or only normalised ones, ``NormaliseViews``).

    A batch whose images are one tensor (validation) passes unchanged, as do float views when
    ``augment`` is ``None`` (the CPU transform augmented them).

    Raises:
        ValueError: uint8 views without ``augment``, float views with it, or a mix of both.
    """
    if not isinstance(batch, (list, tuple)) or len(batch) != 2 or not isinstance(batch[0], (list, tuple)):
        return batch
    views, labels = batch
    raw = [v.dtype == torch.uint8 for v in views]
    if any(raw) and not all(raw):
        raise ValueError(f"augment_batch: views mix uint8 and other dtypes {[v.dtype for v in views]}")
    if all(raw) and views:
        if augment is None:
            raise ValueError(
                "augment_batch: the views are uint8 (ssl_vit.data.gpu_augment.MultiCropCrops, or MultiCropTransform "
                "with uint8_views) but no device augmentation is set: build it with "
                "device_augment_for(datamodule.train_transform)"
            )
        return type(batch)([augment(views), labels])
    if augment is not None:
        raise ValueError(
            f"augment_batch: device augmentation is set but the views are already {views[0].dtype} (augmented by "
            "the CPU transform): use ssl_vit.data.gpu_augment.MultiCropCrops (or MultiCropTransform with "
            "uint8_views) as data.train_transform"
        )
    return batch
