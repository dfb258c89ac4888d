"""The benchmark's ImageNet-like JPEGs, generated at run time from real photographs (never committed).

Decode and resampling speed depend on image content (JPEG entropy, detail), so random noise or
upscaled CIFAR-10 would time a different workload. The sources are the colour photographs that
installed packages ship: scikit-learn's ``load_sample_images`` (two 640x427 photographs), and
scikit-image's ``skimage.data`` photographs when scikit-image is installed. Each benchmark image
is one source photograph, downscaled by a random factor between 1 and the smallest that still holds
the crop (a source smaller than the crop is upscaled just enough), cropped at a random place to
``size`` (500x375 by default, about ImageNet's mean; a portrait crop with probability 0.25), flipped
with probability 0.5, and saved as a baseline 4:2:0 JPEG at ``quality`` (90).

These photographs carry less fine detail than ImageNet's: at quality 90 they average about 50 KB,
not ImageNet's 110, so decoding is about half as costly as on ImageNet. The data benchmark times the
decode alone as its own row, so that share can be read off.
"""
import io
import random
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from ssl_vit.data.shards import write_shards

# skimage.data's colour photographs (loaders; the microscopy and synthetic images are left out)
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "stereo_motorcycle")


def _skimage_photos() -> Dict[str, Callable[[], np.ndarray]]:
    try:
        import skimage.data as data  # optional: only its bundled photographs are read
    except ImportError:
        return {}
    loaders = {}
    for name in SKIMAGE_PHOTOS:
        loader = getattr(data, name, None)
        if loader is not None:
            loaders[f"skimage.data.{name}"] = loader
    return loaders


def source_photographs() -> List[Tuple[str, Image.Image]]:
    """``(name, RGB image)`` of every usable shipped photograph (sklearn's always, skimage's if installed).

    Raises:
        RuntimeError: no photograph could be loaded (scikit-learn missing and no scikit-image).
    """
    photos: List[Tuple[str, Image.Image]] = []
    try:
        from sklearn.datasets import load_sample_images  # ships china.jpg and flower.jpg

        bunch = load_sample_images()
        photos += [(f"sklearn.{Path(f).name}", Image.fromarray(a)) for f, a in zip(bunch.filenames, bunch.images)]
    except ImportError:
        pass
    for name, loader in _skimage_photos().items():
        try:
            pixels = loader()
        except Exception:  # a photograph whose optional reader (tifffile, pooch) is absent is skipped
            continue
        pixels = pixels[0] if isinstance(pixels, tuple) else pixels  # stereo_motorcycle: (left, right, disparity)
        if pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8:
            photos.append((name, Image.fromarray(pixels)))
    if not photos:
        raise RuntimeError(
            "no source photographs: the benchmark images are made from scikit-learn's sample images "
            "(pip install scikit-learn) and, if installed, scikit-image's skimage.data photographs"
        )
    return photos


def make_jpeg(photo: Image.Image, rng: random.Random, size: Tuple[int, int], quality: int) -> bytes:
    """One benchmark image: ``photo`` rescaled, cropped to ``size`` (``(W, H)``, swapped for a portrait),
    maybe flipped, as JPEG bytes."""
    w, h = size if rng.random() >= 0.25 else size[::-1]
    fit = max(w / photo.width, h / photo.height)  # the smallest scale at which the crop fits
    scale = rng.uniform(fit, 1.0) if fit < 1 else fit
    rw, rh = max(w, round(photo.width * scale)), max(h, round(photo.height * scale))
    image = photo.resize((rw, rh), Image.BICUBIC, reducing_gap=None)
    x, y = rng.randint(0, rw - w), rng.randint(0, rh - h)
    image = image.crop((x, y, x + w, y + h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def benchmark_jpegs(
    count: int = 2000, size: Sequence[int] = (500, 375), quality: int = 90, seed: int = 0
) -> List[bytes]:
    """``count`` JPEGs (bytes) made from :func:`source_photographs` in turn (see the module docstring).

    Raises:
        ValueError: a non-positive ``count`` or size, or ``quality`` outside [1, 100].
    """
    if count < 1 or len(size) != 2 or min(size) < 1:
        raise ValueError(f"benchmark images: count and size must be positive, got count={count}, size={size}")
    if not 1 <= quality <= 100:
        raise ValueError(f"benchmark images: JPEG quality must be in [1, 100], got {quality}")
    photos = [photo for _, photo in source_photographs()]
    rng = random.Random(seed)
    return [make_jpeg(photos[i % len(photos)], rng, (int(size[0]), int(size[1])), quality) for i in range(count)]


def describe(jpegs: Sequence[bytes]) -> Dict[str, float]:
    """Count, mean size in KB and mean pixel size of a benchmark set (for the report)."""
    sizes = [Image.open(io.BytesIO(data)).size for data in jpegs[:200]]
    return {
        "images": len(jpegs),
        "mean_kb": round(float(np.mean([len(d) for d in jpegs])) / 1000, 1),
        "mean_width": round(float(np.mean([s[0] for s in sizes])), 1),
        "mean_height": round(float(np.mean([s[1] for s in sizes])), 1),
        "sources": len(source_photographs()),
    }


def write_benchmark_shards(directory: Path, count: int = 2000, shard_size: int = 250, seed: int = 0) -> str:
    """Write ``count`` benchmark JPEGs as unlabelled webdataset shards (with their info JSON) under
    ``directory``; returns the shard pattern (``ShardDataModule``'s ``train``)."""
    images = Path(directory) / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(benchmark_jpegs(count, seed=seed)):
        (images / f"{i:06d}.jpg").write_bytes(data)
    info = write_shards(images, Path(directory) / "shards", "train", shard_size, progress=False, labels="none")
    return str(Path(directory) / "shards" / f"train-{{000000..{len(info['shards']) - 1:06d}}}.tar")
