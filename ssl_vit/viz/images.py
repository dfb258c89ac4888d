"""Images in for the attention tools: files, folders (recursive) and webdataset shards collected
into uniquely named sources, then resized and cropped the way the model sees them."""
import re
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import webdataset as wds
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms.v2 import functional as TF
from webdataset.shardlists import expand_urls

from ssl_vit.data.decode import IMAGE_KEYS as SHARD_IMAGE_KEYS
from ssl_vit.data.decode import IMAGE_SUFFIXES, open_image, to_rgb

PathLike = Union[str, Path]
RESERVED_NAMES = {"index.html", "skipped.json", "jaccard.json"}
# Patches an image may give the attention tools. The captured attention is [heads, T, T] float32 per
# image: 64 MB per head at this bound; a thin 1x1000 image resized to a 32-px shorter side gives
# 32x32000 px, 64,000 patches of 4 px and 16 GB per head.
MAX_TOKENS = 4096


class TooManyPatches(ValueError):
    """An image whose resized crop would give more patches than ``max_tokens``."""


@dataclass
class ImageSource:
    """One input image: a file, or the bytes of a shard member. ``name`` is unique in the output."""

    name: str
    origin: str  # where it came from, for messages
    stem: str  # matched against the foreground masks' file stems
    path: Optional[Path] = None
    data: Optional[bytes] = None

    def open(self) -> Image.Image:
        """The image, lazily opened from a file, or fully decoded (JPEG/PNG/WEBP only) from bytes."""
        return Image.open(self.path) if self.path is not None else open_image(self.data)


def _unique(stem: str, taken: set) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    name, count = base, 1
    while name in taken:
        name, count = f"{base}_{count}", count + 1
    taken.add(name)
    return name


def _shard_sources(url: str, limit: Optional[int] = None) -> List[Tuple[str, bytes]]:
    """(sample key + extension, bytes) of each sample's image member in one webdataset shard (the
    first ``limit`` only, reading no further, when given)."""
    found: List[Tuple[str, bytes]] = []
    try:
        for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
            if limit is not None and len(found) >= limit:
                break
            ext = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
            if ext is not None:
                found.append((f"{sample['__key__']}.{ext}", sample[ext]))
    except Exception as err:  # tarfile / webdataset errors: the shard itself is broken
        raise ValueError(f"cannot read shard {url}: {err}") from err
    return found


def _expand(pattern: str) -> List[Path]:
    paths: List[Path] = []
    for url in expand_urls(pattern):
        matches = sorted(glob(url)) if any(c in url for c in "*?[") else ([url] if Path(url).exists() else [])
        paths.extend(Path(m) for m in matches)
    if not paths:
        raise FileNotFoundError(f"--images: nothing matches {pattern!r}")
    return paths


def collect_images(
    inputs: Sequence[PathLike], limit: Optional[int] = None
) -> Tuple[List[ImageSource], List[Dict[str, str]]]:
    """Expand image files, folders (recursive) and shard patterns into image sources (the first
    ``limit`` of them, reading no further, when given).

    Returns:
        ``(sources, skipped)``; ``skipped`` lists ``{"path", "reason"}`` for files in the inputs that
        are not images (by extension). A path or pattern that matches nothing raises
        ``FileNotFoundError``.
    """
    sources: List[ImageSource] = []
    skipped: List[Dict[str, str]] = []
    taken = set(RESERVED_NAMES)

    def full() -> bool:
        return limit is not None and len(sources) >= limit

    def add_file(path: Path) -> None:
        if full():
            return
        if path.suffix.lower() == ".tar":
            for member, data in _shard_sources(str(path), None if limit is None else limit - len(sources)):
                stem = Path(member).stem
                sources.append(ImageSource(_unique(stem, taken), f"{path}:{member}", stem, data=data))
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            sources.append(ImageSource(_unique(path.stem, taken), str(path), path.stem, path=path))
        else:
            skipped.append({"path": str(path), "reason": f"not an image file (extension {path.suffix or 'none'!r})"})

    for item in inputs:
        text = str(item)
        paths = _expand(text) if any(c in text for c in "*?[{") else [Path(text)]
        for path in paths:
            if path.is_dir():
                for child in sorted(p for p in path.rglob("*") if p.is_file()):
                    add_file(child)
                    if full():
                        break
            elif path.is_file():
                add_file(path)
            else:
                raise FileNotFoundError(f"--images: {path} does not exist")
    return sources, skipped


def resized_size(width: int, height: int, image_size: int) -> Tuple[int, int]:
    """``(H, W)`` after resizing the shorter side to ``image_size``, keeping the aspect ratio."""
    if width <= height:
        return max(1, round(height * image_size / width)), image_size
    return image_size, max(1, round(width * image_size / height))


def crop_size(width: int, height: int, image_size: int, patch: int, max_tokens: Optional[int] = None) -> Tuple[int, int]:
    """``(H, W)`` of the center crop the model sees: the resized size rounded down to patches.

    Raises:
        TooManyPatches: the crop holds more than ``max_tokens`` patches (``None``: no bound).
    """
    h, w = resized_size(width, height, image_size)
    if h < patch or w < patch:
        raise ValueError(f"image_size {image_size} gives {h}x{w}, smaller than the patch size {patch}")
    tokens = (h // patch) * (w // patch)
    if max_tokens is not None and tokens > max_tokens:
        raise TooManyPatches(
            f"a {width}x{height} image resized to a {image_size}-px shorter side is {w}x{h} px: {tokens} patches of "
            f"{patch} px, more than max_tokens={max_tokens} (crop it, or raise max_tokens if memory allows)"
        )
    return h // patch * patch, w // patch * patch


def oriented_size(image: Image.Image) -> Tuple[int, int]:
    """``(width, height)`` after EXIF orientation, read from the header only."""
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def prepare_image(image: Image.Image, image_size: int, patch: int, max_tokens: Optional[int] = None) -> torch.Tensor:
    """Resize (shorter side = ``image_size``) and center-crop to patch multiples: uint8 ``[3, H, W]``.

    Raises:
        TooManyPatches: before any resizing, when the crop would hold more than ``max_tokens`` patches.
    """
    crop_size(*oriented_size(image), image_size, patch, max_tokens)
    image = to_rgb(image)
    size = resized_size(*image.size, image_size)
    image = TF.resize(image, list(size), antialias=True)
    return TF.pil_to_tensor(TF.center_crop(image, list(crop_size(*image.size, image_size, patch))))


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float, normalised with the ImageNet mean/std."""
    return TF.normalize(TF.to_dtype(images, torch.float32, scale=True), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def load_mask(path: Path, image_size_wh: Tuple[int, int], image_size: int, patch: int) -> torch.Tensor:
    """A binary foreground PNG (pixels > 0 are foreground), resized and cropped like its image.

    Returns:
        bool ``[H, W]`` aligned with the crop the model saw.
    """
    mask = Image.open(path)
    mask.load()
    if mask.size != image_size_wh:
        raise ValueError(f"mask {path} is {mask.size[0]}x{mask.size[1]}, its image {image_size_wh[0]}x{image_size_wh[1]}")
    mask = mask.convert("L")
    mask = TF.resize(mask, list(resized_size(*mask.size, image_size)), interpolation=TF.InterpolationMode.NEAREST)
    return TF.pil_to_tensor(TF.center_crop(mask, list(crop_size(*mask.size, image_size, patch))))[0] > 0
