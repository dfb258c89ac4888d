"""The MAE reconstruction loss: mean squared error on the masked patches only."""
from typing import Tuple

import torch

NORM_PIX_EPS = 1e-6


def patch_statistics(patches: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and unbiased variance over its ``p * p * C`` values.

    Args:
        patches: ``[B, L, p*p*C]``.

    Returns:
        ``mean`` and ``var``, each ``[B, L, 1]``.
    """
    return patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)


def normalize_patches(patches: torch.Tensor) -> torch.Tensor:
    """Normalise each patch by its own mean and variance (``norm_pix_loss`` targets).

    Args:
        patches: ``[B, L, p*p*C]``.

    Returns:
        ``(patches - mean) / sqrt(var + 1e-6)``, same shape.
    """
    mean, var = patch_statistics(patches)
    return (patches - mean) / (var + NORM_PIX_EPS).sqrt()


def denormalize_patches(pred: torch.Tensor, target_patches: torch.Tensor) -> torch.Tensor:
    """Map ``norm_pix_loss`` predictions back to pixels with the statistics of the true patches
    (for display only: at test time those statistics are not known for masked patches).

    Args:
        pred: normalised predictions ``[B, L, p*p*C]``.
        target_patches: the true patches ``[B, L, p*p*C]``.

    Returns:
        ``pred * sqrt(var + 1e-6) + mean``, same shape.
    """
    mean, var = patch_statistics(target_patches)
    return pred * (var + NORM_PIX_EPS).sqrt() + mean


def mae_loss(
    pred: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = False
) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    Args:
        pred: predictions ``[B, L, p*p*C]`` (any float dtype; the loss is computed in float32).
        target_patches: true patches ``[B, L, p*p*C]`` (``ssl_vit.models.patches.patchify``).
        mask: ``[B, L]``, 1 for masked patches (the only ones that count), 0 for visible ones.
        norm_pix_loss: compare with per-patch normalised targets (:func:`normalize_patches`).

    Returns:
        Scalar loss.
    """
    if pred.shape != target_patches.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target_patches.shape)} differ in shape")
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the patches {tuple(pred.shape[:2])}")
    target = target_patches.float()
    if norm_pix_loss:
        target = normalize_patches(target)
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # [B, L]
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
