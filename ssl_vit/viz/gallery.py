"""Attention galleries on disk: images in, heat maps, masks, overlays and an ``index.html`` out.

Inputs are image files, folders (searched recursively) and webdataset shards (``*.tar`` files,
glob or brace patterns such as ``shards/train-{000000..000009}.tar``; each sample's first
jpg/jpeg/png/webp member is decoded by ``ssl_vit.data.decode.open_image``, which allows only the
JPEG/PNG/WEBP decoders; other members are ignored; a shard's images are held in memory).
Each image is resized so that its *shorter* side is ``image_size`` (keeping the aspect ratio, EXIF
orientation applied), then center-cropped so both sides are multiples of the patch size, and
normalised with the ImageNet mean/std. Images of the same cropped size are batched together.

For each image ``<output>/<name>/`` holds ``image.png`` (the crop the model saw), ``attention.npy``
(``[heads, h, w]`` float32, the CLS token's attention over the patch grid) and, for each column
(``head_00`` ... , ``mean`` = head mean, ``rollout`` if asked), ``heat_<col>.png`` (min-max
normalised, viridis-like colours, nearest upsampling to the image size), ``mask_<col>.png`` (the
patches keeping ``threshold`` of the attention mass) and ``overlay_<col>.png``. ``index.html``
shows one row per image and one column per head, with relative links only (no server, no network).
"""
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ssl_vit.models.backbone import patch_size
from ssl_vit.viz.attention import attention_maps, best_head, jaccard_index, mass_threshold_masks
from ssl_vit.viz.images import (
    MAX_TOKENS,
    ImageSource,
    PathLike,
    TooManyPatches,
    collect_images,
    crop_size,
    load_mask,
    normalise,
    oriented_size,
    prepare_image,
)
from ssl_vit.viz.page import COLORMAP, GalleryEntry, write_index

WRITER_THREADS = min(8, os.cpu_count() or 1)


def heatmap(values: np.ndarray, size: Tuple[int, int], vmax: Optional[float] = None) -> np.ndarray:
    """``[h, w]`` map -> uint8 RGB ``[H, W, 3]``: coloured on the scale ``[0, vmax]`` (an attention map
    is a distribution: 0 is no attention), nearest upsampling. ``vmax`` None: the map's own maximum."""
    high = float(values.max()) if vmax is None else float(vmax)
    scaled = values / high if high > 0 else np.zeros_like(values)
    index = np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(COLORMAP[index]).resize(size[::-1], Image.NEAREST))


def shared_scale(maps: Dict[str, np.ndarray]) -> Dict[str, float]:
    """The colour scale of one image's row: every attention column (heads, mean, a baseline's mean)
    on ``[0, max]`` of them all; rollout, a product of layers, on its own ``[0, max]``. With the
    uniform level ``1 / tokens`` to read the maps against."""
    attention = [v for c, v in maps.items() if "rollout" not in c]
    rollout = [v for c, v in maps.items() if "rollout" in c]
    first = next(iter(maps.values()))
    scale = {"vmax": float(max(v.max() for v in attention)) if attention else 0.0, "uniform": 1.0 / first.size}
    if rollout:
        scale["rollout_vmax"] = float(max(v.max() for v in rollout))
    return scale


def column_vmax(column: str, scale: Dict[str, float]) -> float:
    return scale["rollout_vmax"] if "rollout" in column else scale["vmax"]


def upsample_mask(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """bool ``[h, w]`` -> bool ``[H, W]`` by nearest neighbour."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size[::-1], Image.NEAREST)) > 0


def overlay(image: np.ndarray, mask: np.ndarray, color: Tuple[int, int, int] = (255, 60, 60)) -> np.ndarray:
    """Tint the masked pixels of ``image`` ``[H, W, 3]`` and darken the rest."""
    out = image.astype(np.float32) * 0.35
    tint = image.astype(np.float32) * 0.6 + np.asarray(color, dtype=np.float32) * 0.4
    out[mask] = tint[mask]
    return out.round().clip(0, 255).astype(np.uint8)


def render_columns(
    image: np.ndarray, maps: Dict[str, np.ndarray], masks: Dict[str, np.ndarray]
) -> Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """column -> (heat map on the row's shared scale, mask, overlay), uint8 at the image's size."""
    size = image.shape[:2]
    scale = shared_scale(maps)
    out = {}
    for col, values in maps.items():
        mask = upsample_mask(masks[col], size)
        out[col] = (heatmap(values, size, column_vmax(col, scale)), mask.astype(np.uint8) * 255, overlay(image, mask))
    return out


def write_image_result(
    directory: Path, image: np.ndarray, attention: np.ndarray, maps: Dict[str, np.ndarray], masks: Dict[str, np.ndarray]
) -> None:
    """Write one image's folder (see the module docstring).

    Args:
        directory: ``<output>/<name>``.
        image: uint8 ``[H, W, 3]``, the crop the model saw.
        attention: ``[heads, h, w]``, saved as ``attention.npy`` (float32).
        maps: column -> ``[h, w]`` map (``head_00``..., ``mean``, optionally ``rollout``).
        masks: column -> bool ``[h, w]`` thresholded map.
    """
    directory.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(directory / "image.png")
    np.save(directory / "attention.npy", attention.astype(np.float32))
    if "rollout" in maps:
        np.save(directory / "rollout.npy", maps["rollout"].astype(np.float32))
    for col, (heat, mask, over) in render_columns(image, maps, masks).items():
        Image.fromarray(heat).save(directory / f"heat_{col}.png")
        Image.fromarray(mask).save(directory / f"mask_{col}.png")
        Image.fromarray(over).save(directory / f"overlay_{col}.png")


def write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def column_maps(attention: torch.Tensor, rollout: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """One image's columns: ``head_00``... ``[h, w]`` from ``[heads, h, w]``, their ``mean``, ``rollout``."""
    maps = {f"head_{i:02d}": attention[i] for i in range(attention.shape[0])}
    maps["mean"] = attention.mean(dim=0)
    if rollout is not None:
        maps["rollout"] = rollout
    return maps


def _attention(model: torch.nn.Module, images: torch.Tensor, layer: int, rollout: bool):
    param = next(model.parameters())
    batch = normalise(images).to(device=param.device, dtype=param.dtype)
    attention, roll = attention_maps(model, batch, layer=layer, rollout=rollout)  # [B, heads, h, w], [B, h, w]
    return attention.float().cpu(), None if roll is None else roll.float().cpu()


def export_batch(
    model: torch.nn.Module,
    images: torch.Tensor,
    names: Sequence[str],
    output: Path,
    threshold: float = 0.6,
    layer: int = -1,
    rollout: bool = False,
    baseline: Optional[torch.nn.Module] = None,
) -> List[Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]]:
    """Compute and write the attention folders of one batch of same-size images.

    Args:
        model: the timm ViT (on its device); it is run on ``images`` moved to its device and dtype.
        images: uint8 ``[B, 3, H, W]`` from ``prepare_image``.
        names: the folder name of each image under ``output``.
        baseline: a second ViT (e.g. the same architecture with random weights) whose head-mean
            (and rollout) are added as ``baseline_mean`` (``baseline_rollout``) columns, on the same scale.

    Returns:
        per image, ``(maps, masks)``: column -> ``[h, w]`` float map and bool mask.
    """
    attention, roll = _attention(model, images, layer, rollout)
    base, base_roll = _attention(baseline, images, layer, rollout) if baseline is not None else (None, None)
    results, jobs = [], []
    for b, name in enumerate(names):
        maps = column_maps(attention[b], None if roll is None else roll[b])
        if base is not None:
            maps["baseline_mean"] = base[b].mean(dim=0)
            if base_roll is not None:
                maps["baseline_rollout"] = base_roll[b]
        masks = mass_threshold_masks(torch.stack(list(maps.values())), threshold)  # [columns, h, w]
        maps_np = {col: value.numpy() for col, value in maps.items()}
        masks_np = {col: masks[i].numpy() for i, col in enumerate(maps)}
        image = np.ascontiguousarray(images[b].permute(1, 2, 0).numpy())  # [H, W, 3]
        jobs.append((output / name, image, attention[b].numpy(), maps_np, masks_np))
        results.append((maps_np, masks_np))
    # PNG encoding dominates the export and releases the GIL: write the images' folders in threads
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), WRITER_THREADS))) as pool:
        for future in [pool.submit(write_image_result, *job) for job in jobs]:
            future.result()  # re-raise any write error
    return results


@dataclass
class ExportResult:
    """What ``export_attention`` did: folder names written, inputs skipped, Jaccard report."""

    output: Path
    exported: List[str]
    skipped: List[Dict[str, str]]
    jaccard: Optional[Dict] = None


def _jaccard_report(scores: Dict[str, Dict[str, float]], missing: List[str], threshold: float, layer: int) -> Dict:
    columns = list(next(iter(scores.values()))) if scores else []
    mean = {col: float(np.mean([s[col] for s in scores.values()])) for col in columns if col != "best_head"}
    return {
        "threshold": threshold,
        "layer": layer,
        "images": len(scores),
        "mean": mean,  # per column (head_XX, mean, rollout, best) over images
        "per_image": scores,
        "missing_masks": missing,
    }


Groups = Dict[Tuple[int, int], List[Tuple[int, ImageSource, Tuple[int, int]]]]


class _Skips(list):
    """``skipped.json``'s entries; each skip also warns, naming the input and why."""

    def add(self, origin: str, reason: str) -> None:
        self.append({"path": origin, "reason": reason})
        warnings.warn(f"attention export: skipped {origin}: {reason}", stacklevel=3)


def _plan(sources: Sequence[ImageSource], image_size: int, patch: int, max_tokens: Optional[int], skipped: _Skips) -> Groups:
    """Images grouped by the crop size the model will see, from their headers only; unreadable
    images and those over ``max_tokens`` patches are skipped before anything is decoded."""
    groups: Groups = {}
    for order, source in enumerate(sources):
        try:
            with source.open() as image:
                size = oriented_size(image)
        except Exception as err:  # PIL raises many types for unreadable files
            skipped.add(source.origin, f"unreadable image: {err}")
            continue
        try:
            crop = crop_size(*size, image_size, patch, max_tokens)
        except TooManyPatches as err:
            skipped.add(source.origin, str(err))
            continue
        groups.setdefault(crop, []).append((order, source, size))
    return groups


def batch_size_for(crop: Tuple[int, int], patch: int, batch_size: int, max_tokens: Optional[int]) -> int:
    """Images per forward pass at ``crop`` (H, W): ``batch_size``, fewer for large crops, so that a
    batch's captured attention (``B x T^2`` per head) never exceeds one image at ``max_tokens``."""
    tokens = (crop[0] // patch) * (crop[1] // patch)
    return batch_size if max_tokens is None else max(1, min(batch_size, max_tokens ** 2 // tokens ** 2))


def export_attention(
    model: torch.nn.Module,
    images: Sequence[PathLike],
    output: PathLike,
    image_size: Optional[int] = None,
    threshold: float = 0.6,
    layer: int = -1,
    batch_size: int = 16,
    rollout: bool = False,
    masks: Optional[PathLike] = None,
    progress: bool = True,
    baseline: Optional[torch.nn.Module] = None,
    max_tokens: Optional[int] = MAX_TOKENS,
) -> ExportResult:
    """Export the attention gallery of ``images`` (files, folders, shard patterns) to ``output``.

    ``image_size`` (the shorter side after resizing) defaults to the model's own resolution: a map
    of a 32-px model upsampled from 224-px input looks smooth and meaningful even from random
    weights. ``baseline`` adds that model's maps (e.g. random weights) beside each row.

    Unreadable images, non-image files and images whose crop would hold more than ``max_tokens``
    patches (a thin 1x1000 image becomes 32x32000 px at a 32-px shorter side; ``None``: no bound)
    are skipped, each with a warning naming it, and listed in ``skipped.json``; when no image can be
    read a ``ValueError`` is raised. Batches of large crops are made smaller (``batch_size_for``).
    ``index.html`` is written for the images done even when a batch fails (the error names the
    batch's images). With ``masks`` (a folder of binary PNGs named like the images' stems), the
    Jaccard index of each column's mask with the foreground is written to ``jaccard.json``
    (``best`` is the best head per image; images without a mask are listed).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    patch = patch_size(model)
    native = min(int(s) for s in model.patch_embed.img_size)
    image_size = native if image_size is None else int(image_size)
    if image_size < patch:
        raise ValueError(f"image_size {image_size} is smaller than the patch size {patch}")
    masks_dir = None if masks is None else Path(masks)
    if masks_dir is not None and not masks_dir.is_dir():
        raise FileNotFoundError(f"--masks: {masks_dir} is not a folder")
    output = Path(output)
    sources, found_skips = collect_images(images)
    skipped = _Skips(found_skips)
    groups = _plan(sources, image_size, patch, max_tokens, skipped)
    planned = sum(len(g) for g in groups.values())
    if planned == 0:
        raise ValueError(f"no readable images in {[str(i) for i in images]} ({len(skipped)} inputs skipped)")

    output.mkdir(parents=True, exist_ok=True)
    entries: Dict[int, GalleryEntry] = {}
    scores: Dict[str, Dict[str, float]] = {}
    missing: List[str] = []
    resolution = (f"at the model's own resolution ({image_size} px)" if image_size == native else
                  f"at {image_size} px (the model was built for {native} px)")
    note = f"layer {layer}, {resolution}, masks keep {threshold:.0%} of the attention mass"
    if baseline is not None:
        note += "; baseline_* columns: the baseline model's maps (e.g. random weights) on the same scale"
    bar = tqdm(total=planned, unit="img", disable=not progress, desc="attention")
    try:
        for crop, members in groups.items():
            step = batch_size_for(crop, patch, batch_size, max_tokens)
            for start in range(0, len(members), step):
                loaded, targets = [], []
                for order, source, size in members[start:start + step]:
                    try:
                        with source.open() as image:
                            tensor = prepare_image(image, image_size, patch)
                    except Exception as err:
                        skipped.add(source.origin, f"unreadable image: {err}")
                        continue
                    target = None
                    if masks_dir is not None:
                        mask_path = masks_dir / f"{source.stem}.png"
                        if mask_path.is_file():
                            target = load_mask(mask_path, size, image_size, patch)
                        else:
                            missing.append(source.name)
                    loaded.append((order, source, tensor))
                    targets.append(target)
                bar.update(len(members[start:start + step]))
                if not loaded:
                    continue
                names = [source.name for _, source, _ in loaded]
                try:
                    results = export_batch(model, torch.stack([t for _, _, t in loaded]), names, output, threshold,
                                           layer, rollout, baseline)
                except Exception as err:  # out of memory, most often: name the images
                    origins = ", ".join(source.origin for _, source, _ in loaded)
                    raise RuntimeError(f"attention export failed on {origins} ({crop[1]}x{crop[0]} px, "
                                       f"{crop[0] * crop[1] // patch ** 2} patches each): {err}") from err
                for (order, source, _), (maps, masks_np), target in zip(loaded, results, targets):
                    entry = GalleryEntry(source.name, list(maps), scale=shared_scale(maps))
                    if target is not None:
                        values = jaccard_index(torch.from_numpy(np.stack(list(masks_np.values()))), target)
                        entry.scores = {col: float(values[i]) for i, col in enumerate(maps)}
                        heads = torch.tensor([entry.scores[c] for c in maps if c.startswith("head_")], dtype=torch.float64)
                        index, value = best_head(heads)
                        scores[source.name] = {**entry.scores, "best": value, "best_head": index}
                    entries[order] = entry
    finally:  # the page of what is done, even when a batch failed
        bar.close()
        write_json(output / "skipped.json", skipped)
        if entries:
            write_index(output, [entries[k] for k in sorted(entries)], "Self-attention maps", note)
    if not entries:
        raise ValueError(f"no readable images in {[str(i) for i in images]} ({len(skipped)} inputs skipped)")
    report = None
    if masks_dir is not None:
        if not scores:
            raise ValueError(f"--masks: no mask in {masks_dir} matches an image stem (expected <stem>.png)")
        report = _jaccard_report(scores, missing, threshold, layer)
        write_json(output / "jaccard.json", report)
    return ExportResult(output, [entries[k].name for k in sorted(entries)], list(skipped), report)
