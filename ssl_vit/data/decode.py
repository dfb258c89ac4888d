"""Safe decoding of untrusted shard samples, and the corrupt-sample accounting of one reader.

Only the members a sample needs are read out of a tar (``.jpg``/``.jpeg``/``.png``/``.webp`` and
``.cls``; anything else, a ``.pyd`` pickle included, is skipped by name before its bytes are read:
:func:`wanted_member`); images are decoded by PIL restricted to the JPEG, PNG and WEBP decoders, and
no pickle-based decoder ever runs. :func:`to_rgb` turns every decoded image into the 8-bit RGB the
transforms take, in one way for training, the shard writer and the attention tools.

Training samples are decoded by :func:`decode_image`, with what the training transform asks for
(:func:`decode_hooks`: its ``decode_size`` and ``jpeg_decoder``). With ``jpeg_decoder="torchvision"``
(off by default) PIL still opens the header (allow-list, decompression-bomb limit, mode), and only the
pixels of a JPEG are decoded by ``torchvision.io.decode_jpeg`` (libjpeg-turbo, as PIL's decoder), into
the upright ``uint8`` ``[3, H, W]`` tensor, channels-last, that a ``torch_resize`` transform crops
without PIL's copies; the pixels are PIL's (tests/data/test_data_jpeg_decoder.py).
"""
import contextlib
import io
import logging
import warnings
from collections import Counter
from typing import Any, Callable, Dict, Iterator, Optional, Set, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg
from webdataset.tariterators import base_plus_ext

logger = logging.getLogger("ssl_vit.data.pipeline")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # member suffixes read as the image, in this priority
# image files ssl_vit picks out of folders (the attention and reconstruction tools, the quality data)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LABEL_KEY = "cls"
PIL_FORMATS = ("JPEG", "PNG", "WEBP")  # the only decoders PIL may use on untrusted bytes
FORMAT_KEYS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MIN_CHECKED_SAMPLES = 100
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# (upright width, upright height) -> the size to let the JPEG decoder downscale to, or None (full size)
DecodeSize = Callable[[int, int], Optional[Tuple[int, int]]]
JPEG_DECODERS = ("pil", "torchvision")  # a transform's ``jpeg_decoder``: who decodes a JPEG's pixels
# PIL's JPEG modes; torchvision's RGB output equals PIL's convert("RGB") for each (the tests compare them)
TORCHVISION_JPEG_MODES = ("L", "RGB", "CMYK")


class CorruptSampleError(ValueError):
    """One sample cannot be decoded (it is skipped and counted)."""


class CorruptDataError(RuntimeError):
    """Too many corrupt samples: the data, not one sample, is broken."""


class ShardReadError(RuntimeError):
    """A shard cannot be opened or is not a readable tar stream."""


# -- decoding -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _corrupt_on_error() -> Iterator[None]:
    """Any exception inside (PIL raises many types on hostile input; the decompression-bomb warning is
    made one) becomes a :class:`CorruptSampleError` naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except Exception as exc:
        raise CorruptSampleError(f"undecodable image ({type(exc).__name__}: {exc})") from exc


def _open_header(data: bytes) -> Image.Image:
    """PIL's lazy open: the header only (format allow-list, decompression-bomb limit, mode, EXIF)."""
    with _corrupt_on_error():
        return Image.open(io.BytesIO(data), formats=PIL_FORMATS)


def _load(image: Image.Image, decode_size: Optional[DecodeSize]) -> Image.Image:
    """The pixels of a lazily opened ``image``, at the draft size ``decode_size`` asks for (JPEGs)."""
    with _corrupt_on_error():
        size = _draft_size(image, decode_size)
        if size is not None:
            image.draft(None, size)
        image.load()
    return image


def open_image(data: bytes, decode_size: Optional[DecodeSize] = None) -> Image.Image:
    """Decode image bytes fully with PIL's JPEG/PNG/WEBP decoders only (``image.format`` is kept).

    Args:
        data: the file's bytes.
        decode_size: for JPEGs, called with the upright size (EXIF orientation applied); a size it
            returns is passed to ``PIL.Image.draft``, which makes libjpeg downscale by 2, 4 or 8 in the
            DCT domain to at least that size (a transform's ``decode_size`` method). Other formats
            ignore it.

    Raises:
        CorruptSampleError: the bytes are not a complete image in one of those formats, or the
            image is larger than PIL's decompression-bomb limit.
    """
    return _load(_open_header(data), decode_size)


def _draft_size(image: Image.Image, decode_size: Optional[DecodeSize]) -> Optional[Tuple[int, int]]:
    """The size (stored orientation) to ask the JPEG decoder of a lazily opened ``image`` for, or None."""
    if decode_size is None or image.format != "JPEG":
        return None
    w, h = image.size
    turned = image.getexif().get(EXIF_ORIENTATION, 1) in TRANSPOSED_ORIENTATIONS
    size = decode_size(h, w) if turned else decode_size(w, h)
    return None if size is None else (size[1], size[0]) if turned else size


def decode_image(
    data: bytes, decode_size: Optional[DecodeSize] = None, jpeg_decoder: str = "pil"
) -> Union[Image.Image, torch.Tensor]:
    """The training decode: image bytes -> upright 8-bit RGB, as a PIL image, or as a ``uint8`` ``[3, H, W]``
    tensor (channels-last strides) for a JPEG when ``jpeg_decoder`` is ``"torchvision"``.

    PIL opens the header either way (:func:`open_image`'s checks). torchvision decodes a JPEG's pixels
    (``decode_jpeg``, RGB, EXIF orientation applied) when its mode is one of
    :data:`TORCHVISION_JPEG_MODES` and ``decode_size`` asks for no draft (libjpeg's DCT downscale is
    PIL's). Everything else, and a JPEG torchvision cannot decode, goes PIL's way
    (:func:`open_image`, :func:`to_rgb`), whose verdict on corrupt bytes is the pipeline's.

    Args:
        data: the file's bytes.
        decode_size: see :func:`open_image`.
        jpeg_decoder: ``"pil"`` or ``"torchvision"`` (:data:`JPEG_DECODERS`).

    Raises:
        CorruptSampleError: as :func:`open_image` and :func:`to_rgb`.
        ValueError: an unknown ``jpeg_decoder``.
    """
    if jpeg_decoder not in JPEG_DECODERS:
        raise ValueError(f"jpeg_decoder must be one of {', '.join(map(repr, JPEG_DECODERS))}, got {jpeg_decoder!r}")
    image = _open_header(data)
    if jpeg_decoder == "torchvision" and image.format == "JPEG" and image.mode in TORCHVISION_JPEG_MODES:
        with _corrupt_on_error():
            drafted = _draft_size(image, decode_size) is not None
        if not drafted:
            try:
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                   apply_exif_orientation=True)  # [3, H, W], strides (1, 3W, 3)
            except RuntimeError:
                pass  # PIL decides: it raises CorruptSampleError for what torchvision could not decode
    return to_rgb(_load(image, decode_size))


def decode_hooks(transform: Any) -> Dict[str, Any]:
    """:func:`decode_image`'s arguments that a training transform sets (``decode_size``: its draft hook;
    ``jpeg_decoder``), the defaults for a transform without them (evaluation transforms, None)."""
    return {
        "decode_size": getattr(transform, "decode_size", None),
        "jpeg_decoder": getattr(transform, "jpeg_decoder", "pil"),
    }


# Modes whose convert("RGB") keeps the full range and the colours (alpha, if any, is dropped, as
# torchvision's ImageFolder loader does). LAB is not here: PIL converts it to RGB by copying bands.
_CONVERTIBLE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV"}
_SIXTEEN_BIT_MAX = 65535


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``image``, upright (its EXIF orientation applied).

    16-bit modes (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``; a 16-bit grayscale PNG) are scaled by
    255 / 65535 (rounded), so white stays white and nothing clips (``convert("RGB")`` clips them to
    all 255). Mode ``I`` (32-bit integers) is read the same way, as 16-bit values, which is what PIL
    holds in it for 16-bit files; values outside ``[0, 65535]`` are refused. ``F`` (floating point)
    has no agreed range and is refused, as are the modes PIL cannot convert correctly (``LAB``...).

    Raises:
        CorruptSampleError: a refused mode, named in the message.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        pixels = np.asarray(image).astype(np.int64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > _SIXTEEN_BIT_MAX):
            raise CorruptSampleError(
                f"image mode {mode!r} with values in [{pixels.min()}, {pixels.max()}], outside the 16-bit range "
                f"[0, {_SIXTEEN_BIT_MAX}]: convert it to 8 or 16 bits first"
            )
        gray = (pixels * 255 + _SIXTEEN_BIT_MAX // 2) // _SIXTEEN_BIT_MAX
        return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")
    if mode not in _CONVERTIBLE_MODES:
        raise CorruptSampleError(
            f"image mode {mode!r} cannot be converted to 8-bit RGB faithfully (supported: 16-bit and "
            f"{', '.join(sorted(_CONVERTIBLE_MODES))}): convert the file first"
        )
    if mode in ("P", "PA"):  # through RGBA, so that a palette with transparency converts without a warning
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_label(data: bytes, num_classes: int = 0) -> int:
    """ASCII integer class index; checked against ``num_classes`` when that is known (> 0)."""
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptSampleError(f"malformed .cls member {data[:20]!r}") from exc
    if label < 0 or (num_classes > 0 and label >= num_classes):
        raise CorruptSampleError(f"class index {label} outside [0, {num_classes})")
    return label


def decode_sample(
    sample: Dict[str, Any], num_classes: int = 0, decode_size: Optional[DecodeSize] = None, jpeg_decoder: str = "pil"
) -> Tuple[Union[Image.Image, torch.Tensor], int]:
    """A raw webdataset sample (suffix -> bytes) -> (RGB image, label); label -1 without ``.cls``.
    ``decode_size``, ``jpeg_decoder``: see :func:`decode_image` (the training transform's: :func:`decode_hooks`)."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise CorruptSampleError(f"no image member ({'/'.join('.' + k for k in IMAGE_KEYS)})")
    image = decode_image(sample[key], decode_size, jpeg_decoder)
    label = decode_label(sample[LABEL_KEY], num_classes) if LABEL_KEY in sample else -1
    return image, label


def wanted_member(name: str) -> bool:
    """Tar members to read: the image and label suffixes only (checked before any bytes are read)."""
    suffix = base_plus_ext(name)[1]
    return suffix is not None and suffix.lower() in (*IMAGE_KEYS, LABEL_KEY)


class CorruptCounter:
    """Counts decoded and corrupt samples of one reader and enforces ``max_fraction``.

    Each corrupt sample counts (and is logged) once, however often the reader meets it: padding and
    the replacements for corrupt samples wrap around the epoch and read some samples twice.

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
        self._known: Set[Tuple[str, str]] = set()  # (source, key) of the corrupt samples met

    def good(self) -> None:
        self.seen += 1

    def bad(self, source: str, key: str, reason: str) -> None:
        if (source, key) in self._known:
            return
        self._known.add((source, key))
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
