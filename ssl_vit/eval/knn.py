"""Weighted k-NN classification on features (the DINO protocol, Wu et al. 2018)."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor

# What the k-NN stage (``ssl-vit validate``) and the k-NN monitor (during pretraining) log: one name
# for one measurement, the weighted k-NN accuracy on the val split.
KNN_TOP1, KNN_TOP5 = "val/knn_top1", "val/knn_top5"


@torch.no_grad()
def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 4096,
    bank_chunk_size: int = 65536,
) -> Tensor:
    """Weighted k-NN class scores (Wu et al. 2018, as DINO's ``knn_classifier``).

    Features are L2-normalised; each query's ``k`` most cosine-similar bank entries vote for their
    class with weight ``exp(sim / temperature)``.

    Args:
        train_feats: bank ``[N, F]`` (any device; moved to ``test_feats``' device in chunks).
        train_labels: ``[N]`` in ``[0, num_classes)``.
        test_feats: queries ``[Q, F]``; computation happens on their device.
        num_classes: ``C``.
        k: neighbours (capped at ``N``).
        temperature: vote temperature ``T``.
        chunk_size: queries per chunk.
        bank_chunk_size: bank rows per chunk (the running top-k is merged across chunks).

    Returns:
        ``[Q, C]`` summed vote weights; ``scores.argmax(1)`` is the prediction.
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"k-NN needs [N, F] and [Q, F] features, got {tuple(train_feats.shape)} and {tuple(test_feats.shape)}")
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(f"train_labels {tuple(train_labels.shape)} do not match the bank {tuple(train_feats.shape)}")
    if train_feats.shape[0] == 0 or k < 1 or temperature <= 0 or chunk_size < 1 or bank_chunk_size < 1:
        raise ValueError(f"k-NN needs a non-empty bank, k >= 1, temperature > 0 and chunk sizes >= 1 (k={k}, T={temperature})")
    if int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes:
        raise ValueError(f"k-NN bank labels must be in [0, {num_classes}), got [{int(train_labels.min())}, {int(train_labels.max())}]")
    device = test_feats.device
    k = min(k, train_feats.shape[0])
    scores = []
    for q in range(0, test_feats.shape[0], chunk_size):
        query = F.normalize(test_feats[q : q + chunk_size].float(), dim=1)  # [q, F]
        best_sim = query.new_full((query.shape[0], 0), -math.inf)
        best_idx = torch.empty((query.shape[0], 0), dtype=torch.long, device=device)
        for b in range(0, train_feats.shape[0], bank_chunk_size):
            bank = F.normalize(train_feats[b : b + bank_chunk_size].to(device, non_blocking=True).float(), dim=1)
            sim = query @ bank.T  # [q, b]
            top_sim, top_idx = sim.topk(min(k, sim.shape[1]), dim=1)
            merged_sim = torch.cat([best_sim, top_sim], dim=1)
            merged_idx = torch.cat([best_idx, top_idx + b], dim=1)
            best_sim, order = merged_sim.topk(min(k, merged_sim.shape[1]), dim=1)
            best_idx = merged_idx.gather(1, order)
        votes = train_labels.to(device)[best_idx]  # [q, k]
        weights = (best_sim / temperature).exp()
        scores.append(torch.zeros(query.shape[0], num_classes, device=device).scatter_add_(1, votes, weights))
    return torch.cat(scores)
