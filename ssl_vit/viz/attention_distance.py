"""How far each head looks: mean attention distance (ViT paper, Fig. 7) and attention entropy.

For one head and one query patch, the attention distance is the attention-weighted mean of the
pixel distance between the centres of the query patch and of each key patch. It is averaged over
the query patches of an image, then over the images. A head with distance near 0 attends to its own
neighbourhood, like a small convolution; one near the image's mean pairwise distance looks
everywhere (uniform attention over a ``g x g`` grid of ``p``-pixel patches gives the mean distance
between two random cells of the grid, times ``p``).

The CLS token (and any register token) has no position. As in the paper, the distance is
patch-to-patch: only patch queries count, and each query's attention over the patch keys is
renormalised to sum to 1 (what it gives the prefix tokens is left out, not counted as distance 0,
so a head that mostly attends to CLS is not reported as local). That share is reported separately
per head (``prefix_share``). The entropy (nats) is that of each patch query's whole attention row,
prefix tokens included: ``log(T)`` for uniform attention, 0 for attention on one token.

:func:`attention_statistics` works on captured attention; :func:`measure_attention_distance` runs a
model over images on timm's manual attention path (``ssl_vit.viz.attention.all_attentions``).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ssl_vit.models.backbone import patch_size
from ssl_vit.viz.attention import all_attentions
from ssl_vit.viz.images import PathLike, collect_images, normalise, prepare_image
from ssl_vit.viz.plot import scatter_png


def patch_distances(grid: Tuple[int, int], patch: int) -> torch.Tensor:
    """Pixel distances between the centres of every pair of patches: ``[h*w, h*w]`` (float64),
    patches in row-major order (timm's token order)."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1) * patch  # the offset cancels  # [N, 2]
    return torch.cdist(centres, centres)


def attention_statistics(attention: torch.Tensor, grid: Tuple[int, int], patch: int,
                         num_prefix_tokens: int) -> Dict[str, torch.Tensor]:
    """Per image and head: mean attention distance (px), entropy (nats), share given to prefix tokens.

    Args:
        attention: post-softmax ``[B, heads, T, T]`` with ``T = num_prefix_tokens + h * w``.
        grid: the patch grid ``(h, w)``.
        patch: patch side in pixels.
        num_prefix_tokens: CLS + register tokens, before the patches.

    Returns:
        ``{"distance", "entropy", "prefix_share"}``, each ``[B, heads]`` float64: means over the
        patch queries.

    Raises:
        ValueError: the attention does not fit the grid.
    """
    h, w = grid
    tokens = num_prefix_tokens + h * w
    if attention.ndim != 4 or attention.shape[-2:] != (tokens, tokens):
        raise ValueError(f"attention of shape {tuple(attention.shape)} does not fit {num_prefix_tokens} prefix "
                         f"tokens + a {h}x{w} grid: expected [B, heads, {tokens}, {tokens}]")
    rows = attention[..., num_prefix_tokens:, :].double()  # patch queries  # [B, heads, N, T]
    to_patches = rows[..., num_prefix_tokens:]  # [B, heads, N, N]
    mass = to_patches.sum(dim=-1)  # [B, heads, N]
    distances = patch_distances(grid, patch).to(rows.device)  # [N, N]
    # a query that gives the patches nothing has no patch distance: it counts as 0, with a 0 mass
    distance = (to_patches * distances).sum(dim=-1) / mass.clamp(min=torch.finfo(torch.float64).tiny)
    entropy = -torch.special.xlogy(rows, rows).sum(dim=-1)
    return {"distance": distance.mean(dim=-1), "entropy": entropy.mean(dim=-1),
            "prefix_share": rows[..., :num_prefix_tokens].sum(dim=-1).mean(dim=-1)}


@dataclass
class AttentionDistance:
    """Per layer (first block first) and head: means over patch queries, then over images."""
    distance: torch.Tensor  # [layers, heads] pixels
    entropy: torch.Tensor  # [layers, heads] nats
    prefix_share: torch.Tensor  # [layers, heads] attention of patch queries on CLS / registers
    images: int
    patch: int

    def to_json(self) -> Dict[str, object]:
        return {"images": self.images, "patch_size": self.patch,
                "cls_handling": "patch queries to patch keys, each row renormalised over the patches; the share "
                                "on prefix tokens is prefix_share",
                "layers": [{"layer": i, "distance_px": self.distance[i].tolist(), "entropy": self.entropy[i].tolist(),
                            "prefix_share": self.prefix_share[i].tolist()} for i in range(len(self.distance))]}


def load_images(inputs: Sequence[PathLike], image_size: int, patch: int, limit: Optional[int] = None,
                max_tokens: Optional[int] = None) -> Tuple[List[Tuple[str, torch.Tensor]], List[Dict[str, str]]]:
    """The first ``limit`` images of files, folders or shard patterns, resized (shorter side
    ``image_size``) and center-cropped to patch multiples: ``([(name, uint8 [3, H, W])], skipped)``."""
    sources, skipped = collect_images(inputs, limit=limit)
    loaded = []
    for source in sources:
        try:
            with source.open() as image:
                loaded.append((source.name, prepare_image(image, image_size, patch, max_tokens)))
        except Exception as err:  # PIL raises many types for unreadable files; TooManyPatches names itself
            skipped.append({"path": source.origin, "reason": str(err)})
    return loaded, skipped


def measure_attention_distance(model: nn.Module, images: Sequence[torch.Tensor], batch_size: int = 32
                               ) -> AttentionDistance:
    """Mean attention distance, entropy and prefix share of every head of ``model`` over ``images``.

    Args:
        model: a timm ViT on its device (all blocks run on the manual attention path).
        images: uint8 ``[3, H, W]`` each (``prepare_image``); images of one size are batched together.
        batch_size: images per forward.

    Raises:
        ValueError: no images.
    """
    if not images:
        raise ValueError("attention distance needs at least one image")
    param = next(model.parameters())
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    patch = patch_size(model)
    sums: Dict[str, torch.Tensor] = {}
    by_shape: Dict[Tuple[int, ...], List[torch.Tensor]] = {}
    for image in images:
        by_shape.setdefault(tuple(image.shape), []).append(image)
    for shape, group in by_shape.items():
        grid = (shape[1] // patch, shape[2] // patch)
        for start in range(0, len(group), batch_size):
            batch = normalise(torch.stack(group[start:start + batch_size])).to(device=param.device, dtype=param.dtype)
            for i, attention in enumerate(all_attentions(model, batch)):
                for key, value in attention_statistics(attention, grid, patch, prefix).items():
                    total = value.sum(dim=0).cpu()  # [heads]
                    sums.setdefault(key, torch.zeros(len(model.blocks), total.shape[0], dtype=torch.float64))
                    sums[key][i] += total
    return AttentionDistance(**{k: v / len(images) for k, v in sums.items()}, images=len(images), patch=patch)


def plot_attention_distance(result: AttentionDistance, output: PathLike, title: str = "") -> List[Path]:
    """``attention_distance.png`` and ``attention_entropy.png`` in ``output``: layers on x (1 = the
    first block), one dot per head."""
    output = Path(output)
    layers = list(range(1, len(result.distance) + 1))
    written = []
    for values, name, label in ((result.distance, "attention_distance", "mean attention distance (px)"),
                                (result.entropy, "attention_entropy", "attention entropy (nats)")):
        points = [(layer, float(v)) for layer, row in zip(layers, values) for v in row]
        written.append(scatter_png(output / f"{name}.png", {"": points}, "layer (block)", label,
                                   title=f"{title}{', ' if title else ''}{result.images} images, one dot per head",
                                   x_ticks=layers, y_from_zero=True))
    return written
