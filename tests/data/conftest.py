"""Tiny ImageFolder trees of generated images, shared by the data tests."""
import io
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest
from PIL import Image


def _image_bytes(seed: int, size: int = 8, fmt: str = "JPEG") -> bytes:
    """A random ``size x size`` RGB image encoded as ``fmt``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def image_bytes() -> Callable[..., bytes]:
    """``image_bytes(seed, size=8, fmt="JPEG")``: a random RGB image, encoded."""
    return _image_bytes


@pytest.fixture
def make_folder() -> Callable[..., Dict[str, Tuple[bytes, int]]]:
    """``make_folder(root, per_class, size=8)``: writes ``root/c000/NNN.jpg``... with ``per_class[i]``
    JPEGs in class ``i``; returns ``{path: (bytes, class index)}``."""

    def make(root: Path, per_class: List[int], size: int = 8) -> Dict[str, Tuple[bytes, int]]:
        files = {}
        for label, count in enumerate(per_class):
            (root / f"c{label:03d}").mkdir(parents=True, exist_ok=True)
            for j in range(count):
                path = root / f"c{label:03d}" / f"{j:03d}.jpg"
                data = _image_bytes(1000 * label + j, size)
                path.write_bytes(data)
                files[str(path)] = (data, label)
        return files

    return make
