"""Frozen-backbone features in the reference evaluations' layouts, and extracting them over a loader.

* :func:`vit_features`: the feature a probe or k-NN reads off a ViT (CLS of the last blocks after
  the final norm, mean patch token, DINO's interleaved CLS + mean, MAE's global pool).
* :func:`extract_features`: run a feature function over a dataloader once -> ``(feats, labels)``.
"""
from typing import Callable, Iterable, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from tqdm.auto import tqdm

Feature = Literal["cls", "avg", "cls_avg", "gap"]
FEATURES = ("cls", "avg", "cls_avg", "gap")
GAP_NORM_EPS = 1e-6  # the reference fc_norm: LayerNorm(D, eps=1e-6), fresh (weight 1, bias 0)


def feature_dim(model: VisionTransformer, feature: Feature = "cls", n_last_blocks: int = 1) -> int:
    """Width of :func:`vit_features`: ``D * n_last_blocks`` CLS tokens, ``D`` for a mean, ``2 D`` for both."""
    check_feature(model, feature, n_last_blocks)
    return model.embed_dim * {"cls": n_last_blocks, "avg": 1, "gap": 1, "cls_avg": 2}[feature]


def check_feature(model: VisionTransformer, feature: str, n_last_blocks: int) -> None:
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    if not 1 <= n_last_blocks <= len(model.blocks):
        raise ValueError(f"n_last_blocks must be in [1, {len(model.blocks)}] for this backbone, got {n_last_blocks}")
    if feature != "cls" and n_last_blocks != 1:
        raise ValueError(
            f"feature={feature!r} reads the last block only (as the references' average pooling): "
            f"n_last_blocks must be 1, got {n_last_blocks}"
        )
    if feature in ("cls", "cls_avg") and getattr(model, "cls_token", None) is None:
        raise ValueError(f"feature={feature!r} needs a CLS token, this backbone has none: use feature='avg' or 'gap'")


def vit_features(model: VisionTransformer, images: Tensor, feature: Feature = "cls", n_last_blocks: int = 1) -> Tensor:
    """Frozen-backbone feature, in the layout of the reference linear evaluations.

    Args:
        model: timm ViT.
        images: ``[B, C, H, W]``.
        feature:

            * ``"cls"``: the CLS tokens of the last ``n_last_blocks`` blocks, each after the final
              norm, concatenated (DINO ``eval_linear``; with ``n_last_blocks=1`` this is
              ``model(images)`` for token pooling, and MAE's ``--cls_token`` probe);
            * ``"avg"``: the mean patch token of the last block after the final norm (DINO's
              ``avgpool_patchtokens`` part, and k-NN on average pooling);
            * ``"cls_avg"``: DINO's ``avgpool_patchtokens`` feature (ViT-B): CLS and mean
              **interleaved per channel**, ``[cls_0, avg_0, cls_1, avg_1, ...]``, as the reference
              lays it out, so released DINO linear heads apply as they are;
            * ``"gap"``: MAE's ``--global_pool`` feature: the mean patch token of the last block
              **before** the final norm, then a fresh ``fc_norm`` (LayerNorm, eps 1e-6, weight 1, bias
              0: the pretrained ``norm`` is dropped, as facebookresearch/mae ``models_vit`` does).
        n_last_blocks: number of last blocks whose CLS token is used (``"cls"`` only).

    Returns:
        ``[B, feature_dim(model, feature, n_last_blocks)]``.
    """
    outputs = model.forward_intermediates(
        images, indices=n_last_blocks, return_prefix_tokens=True, norm=feature != "gap", output_fmt="NLC",
        intermediates_only=True,
    )  # n_last_blocks x ([B, N, D] patch tokens, [B, P, D] prefix tokens)
    if feature == "cls":
        return torch.cat([prefix[:, 0] for _, prefix in outputs], dim=-1)
    patches, prefix = outputs[-1]
    mean = patches.mean(dim=1)  # [B, D]
    if feature == "avg":
        return mean
    if feature == "gap":
        return F.layer_norm(mean, mean.shape[-1:], eps=GAP_NORM_EPS)
    return torch.stack([prefix[:, 0], mean], dim=-1).flatten(1)  # [B, D, 2] -> [B, 2 D] interleaved


@torch.no_grad()
def extract_features(
    feature_fn: Callable[[Tensor], Tensor],
    dataloader: Iterable,
    device: Optional[torch.device] = None,
    out_device: torch.device = torch.device("cpu"),
    progress: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Run ``feature_fn`` over every ``(images, labels)`` batch of ``dataloader`` once.

    Args:
        feature_fn: ``[B, C, H, W] -> [B, F]`` (e.g. a frozen backbone in eval mode).
        dataloader: yields ``(images, labels)``.
        device: where the images go (``None``: left where they are).
        out_device: where the features are gathered (CPU by default: the bank may be large).
        progress: a tqdm bar with this description (``None``: no bar).

    Returns:
        ``feats [N, F]`` (float32) and ``labels [N]`` (int64), on ``out_device``.
    """
    feats, labels = [], []
    batches = tqdm(dataloader, desc=progress, unit="batch", leave=False) if progress else dataloader
    for batch in batches:
        images, targets = batch[0], batch[1]
        if not isinstance(images, Tensor):
            raise TypeError(f"feature extraction needs image tensors [B, C, H, W], got {type(images).__name__} (multi-crop views?)")
        if device is not None:
            images = images.to(device, non_blocking=True)
        feats.append(feature_fn(images).float().to(out_device))
        labels.append(torch.as_tensor(targets).long().to(out_device))
    if not feats:
        raise ValueError("feature extraction got an empty dataloader")
    return torch.cat(feats), torch.cat(labels)
