"""Safe decoding of untrusted shard samples, and the corrupt-sample accounting of one reader.

Only the members a sample needs are read out of a tar (``.jpg``/``.jpeg``/``.png``/``.webp`` and
``.cls``; anything else, a ``.pyd`` pickle included, is skipped by name before its bytes are read:
:func:`wanted_member`); images are decoded by PIL restricted to the JPEG, PNG and WEBP decoders, and
no pickle-based decoder ever runs.
"""
import io
import logging
import warnings
from collections import Counter
from typing import Any, Dict, Tuple

from PIL import Image
from webdataset.tariterators import base_plus_ext

logger = logging.getLogger("ssl_vit.data.pipeline")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # member suffixes read as the image, in this priority
# image files ssl_vit picks out of folders (the attention and reconstruction tools, the quality data)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LABEL_KEY = "cls"
PIL_FORMATS = ("JPEG", "PNG", "WEBP")  # the only decoders PIL may use on untrusted bytes
FORMAT_KEYS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MIN_CHECKED_SAMPLES = 100


class CorruptSampleError(ValueError):
    """One sample cannot be decoded (it is skipped and counted)."""


class CorruptDataError(RuntimeError):
    """Too many corrupt samples: the data, not one sample, is broken."""


class ShardReadError(RuntimeError):
    """A shard cannot be opened or is not a readable tar stream."""


# -- decoding -------------------------------------------------------------------------------------
def open_image(data: bytes) -> Image.Image:
    """Decode image bytes fully with PIL's JPEG/PNG/WEBP decoders only (``image.format`` is kept).

    Raises:
        CorruptSampleError: the bytes are not a complete image in one of those formats, or the
            image is larger than PIL's decompression-bomb limit.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            image.load()
    except Exception as exc:  # PIL raises many types on hostile input; all mean "corrupt"
        raise CorruptSampleError(f"undecodable image ({type(exc).__name__}: {exc})") from exc
    return image


def decode_label(data: bytes, num_classes: int = 0) -> int:
    """ASCII integer class index; checked against ``num_classes`` when that is known (> 0)."""
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptSampleError(f"malformed .cls member {data[:20]!r}") from exc
    if label < 0 or (num_classes > 0 and label >= num_classes):
        raise CorruptSampleError(f"class index {label} outside [0, {num_classes})")
    return label


def decode_sample(sample: Dict[str, Any], num_classes: int = 0) -> Tuple[Image.Image, int]:
    """A raw webdataset sample (suffix -> bytes) -> (RGB PIL image, label); label -1 without ``.cls``."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise CorruptSampleError(f"no image member ({'/'.join('.' + k for k in IMAGE_KEYS)})")
    image = open_image(sample[key]).convert("RGB")
    label = decode_label(sample[LABEL_KEY], num_classes) if LABEL_KEY in sample else -1
    return image, label


def wanted_member(name: str) -> bool:
    """Tar members to read: the image and label suffixes only (checked before any bytes are read)."""
    suffix = base_plus_ext(name)[1]
    return suffix is not None and suffix.lower() in (*IMAGE_KEYS, LABEL_KEY)


class CorruptCounter:
    """Counts decoded and corrupt samples of one reader and enforces ``max_fraction``.

    Args:
        max_fraction: largest tolerated ``corrupt / seen``.
        where: the reader, for messages (``"rank 0 worker 1"``).
        min_checked: samples to decode before the fraction is checked mid-epoch.
    """

    def __init__(self, max_fraction: float, where: str, min_checked: int = MIN_CHECKED_SAMPLES) -> None:
        self.max_fraction, self.where, self.min_checked = max_fraction, where, min_checked
        self.seen = 0
        self.corrupt = 0
        self.by_source: Counter = Counter()

    def good(self) -> None:
        self.seen += 1

    def bad(self, source: str, key: str, reason: str) -> None:
        self.seen += 1
        self.corrupt += 1
        self.by_source[source] += 1
        logger.warning("skipping corrupt sample %r of %s (%s): %s", key, source, self.where, reason)
        if self.seen >= self.min_checked:
            self.check()

    def check(self) -> None:
        """Raise :class:`CorruptDataError` when the fraction so far exceeds ``max_fraction``."""
        if self.seen and self.corrupt / self.seen > self.max_fraction:
            raise CorruptDataError(
                f"{self.corrupt} of {self.seen} samples read by {self.where} are corrupt "
                f"({self.corrupt / self.seen:.2%} > max_corrupt_fraction={self.max_fraction:.2%}); "
                f"corrupt samples by source: {dict(self.by_source)}"
            )

    def stats(self) -> Dict[str, Any]:
        return {"seen": self.seen, "corrupt": self.corrupt, "by_source": dict(self.by_source)}
