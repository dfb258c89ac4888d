"""Frozen-backbone features and weighted k-NN classification (the DINO protocol).

* :func:`vit_features`: the feature a probe or k-NN reads off a ViT (CLS of the last blocks after
  the final norm, mean patch token, or both).
* :func:`extract_features`: run a feature function over a dataloader once -> ``(feats, labels)``.
* :func:`knn_classify`: weighted k-NN (cosine similarity, votes ``exp(sim / T)``), chunked over the
  queries and the bank, so the bank may live on the CPU and be larger than accelerator memory.
* :class:`KNNEval`: the ``ssl-vit validate`` stage: train-set features once, then ``val/knn_top1``.

The k-NN monitor callback (``ssl_vit.callbacks.knn.KNNMonitor``) uses the same functions.
"""
import math
from typing import Any, Callable, Dict, Iterable, Literal, Optional, Tuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.distributed import DistributedSampler
from torchmetrics.classification import MulticlassAccuracy

from ssl_vit.export.backbone import read_backbone
from ssl_vit.methods.base import CHECKPOINT_KEY, backbone_metadata
from ssl_vit.models.backbone import create_backbone

Feature = Literal["cls", "avg", "cls_avg", "gap"]
FEATURES = ("cls", "avg", "cls_avg", "gap")
GAP_NORM_EPS = 1e-6  # the reference fc_norm: LayerNorm(D, eps=1e-6), fresh (weight 1, bias 0)


# -- features ---------------------------------------------------------------------------------------
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
    if feature in ("cls", "cls_avg") and not model.has_class_token:
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
) -> Tuple[Tensor, Tensor]:
    """Run ``feature_fn`` over every ``(images, labels)`` batch of ``dataloader`` once.

    Args:
        feature_fn: ``[B, C, H, W] -> [B, F]`` (e.g. a frozen backbone in eval mode).
        dataloader: yields ``(images, labels)``.
        device: where the images go (``None``: left where they are).
        out_device: where the features are gathered (CPU by default: the bank may be large).

    Returns:
        ``feats [N, F]`` (float32) and ``labels [N]`` (int64), on ``out_device``.
    """
    feats, labels = [], []
    for batch in dataloader:
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


# -- distribution -----------------------------------------------------------------------------------
def split_for_rank(dataloader: Any, rank: int, world_size: int) -> Any:
    """The part of ``dataloader`` this rank reads when Lightning does not inject a sampler.

    Iterable datasets (webdataset shards) split by rank themselves and are returned as they are, as
    are loaders with a ``DistributedSampler``; other map-style loaders are rebuilt reading indices
    ``rank, rank + world_size, ...`` (no padding, so no sample is counted twice).
    """
    if world_size == 1 or not isinstance(dataloader, DataLoader):
        return dataloader
    if isinstance(dataloader.dataset, IterableDataset) or isinstance(dataloader.sampler, DistributedSampler):
        return dataloader
    indices = list(range(rank, len(dataloader.dataset), world_size))
    return DataLoader(
        dataloader.dataset,
        batch_size=dataloader.batch_size,
        sampler=indices,
        num_workers=dataloader.num_workers,
        collate_fn=dataloader.collate_fn,
        pin_memory=dataloader.pin_memory,
    )


def gather_rows(x: Tensor, all_gather: Callable[[Tensor], Tensor], world_size: int, device: torch.device, chunk: int = 65536) -> Tensor:
    """Concatenate ``x [n_r, ...]`` of every rank (sizes may differ) on every rank, on ``x``'s device.

    Args:
        x: this rank's rows.
        all_gather: ``LightningModule.all_gather`` (stacks ``[world_size, ...]``).
        world_size: number of processes.
        device: the accelerator the collective runs on; rows travel there in chunks of ``chunk``
            rows, so a CPU bank is never on the accelerator all at once.
    """
    if world_size == 1:
        return x
    sizes = all_gather(torch.tensor([x.shape[0]], device=device)).view(-1).tolist()
    longest = max(sizes)
    padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    pieces = []
    for start in range(0, longest, chunk):
        pieces.append(all_gather(padded[start : start + chunk].to(device)).to(x.device))  # [W, c, ...]
    stacked = torch.cat(pieces, dim=1)  # [W, longest, ...]
    return torch.cat([stacked[r, : sizes[r]] for r in range(world_size)])


# -- k-NN -------------------------------------------------------------------------------------------
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


# -- the validate stage -----------------------------------------------------------------------------
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
        if k < 1 or temperature <= 0:
            raise ValueError(f"KNNEval needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
        self.save_hyperparameters()
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
        feats, labels = extract_features(self.features, loader, self.device, out_device=out_device)
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
        self.log_dict({"val/knn_top1": self.top1, "val/knn_top5": self.top5}, on_epoch=True, batch_size=len(labels))

    def on_validation_end(self) -> None:
        self.bank = None

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = backbone_metadata("knn", self.backbone_arch, self.backbone_kwargs, {"backbone": "backbone."}, "backbone")


# -- shared by the evaluation stages ----------------------------------------------------------------
def build_frozen_backbone(
    weights: Optional[str], arch: Optional[str], role: Optional[str], backbone_kwargs: Optional[Dict[str, Any]]
) -> Tuple[VisionTransformer, str, Dict[str, Any]]:
    """A backbone in eval mode with gradients off, from ``weights`` (any format) or random (``arch``)."""
    model, arch, kwargs = build_backbone(weights, arch, role, backbone_kwargs)
    model.eval().requires_grad_(False)
    return model, arch, kwargs


def build_backbone(
    weights: Optional[str], arch: Optional[str], role: Optional[str], backbone_kwargs: Optional[Dict[str, Any]]
) -> Tuple[VisionTransformer, str, Dict[str, Any]]:
    """``(model, arch, kwargs)`` from ``weights`` via ``read_backbone``, or ``create_backbone(arch)``."""
    kwargs = dict(backbone_kwargs or {})
    if weights is not None:
        loaded = read_backbone(weights, arch, role, **kwargs)
        return loaded.model, loaded.arch, loaded.kwargs
    if arch is None:
        raise ValueError("give `weights` (a backbone file) or `arch` (for a randomly initialised backbone)")
    if role is not None:
        raise ValueError(f"role={role!r} needs `weights`")
    return create_backbone(arch, **kwargs), arch, {k: v for k, v in kwargs.items() if k != "drop_path_rate"}


def resolve_num_classes(num_classes: Optional[int], trainer: "pl.Trainer") -> int:
    """``num_classes`` checked against the datamodule's (or taken from it when None)."""
    found = getattr(getattr(trainer, "datamodule", None), "num_classes", None)
    if num_classes is None:
        if not found:
            raise ValueError("num_classes is not given and the datamodule does not say it (datamodule.num_classes)")
        return int(found)
    if found and int(found) != num_classes:
        raise ValueError(f"num_classes={num_classes} is given, but the datamodule has {found} classes")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return num_classes
