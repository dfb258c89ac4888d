"""scikit-learn's bundled digits (1,797 8x8 images, no download) as an ImageFolder tree, for the demo.

``output_dir/train/<digit>/<index>.png`` and ``output_dir/test/<digit>/<index>.png``: RGB PNGs
upscaled (bicubic, so a patch is not one flat pixel) to ``size x size``, split stratified by digit.
"""
import shutil
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def export_digits(
    output_dir: Union[str, Path],
    size: int = 32,
    test_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Write the digits as PNG files; returns ``{"root", "train", "test", "classes"}`` (counts).

    Args:
        output_dir: receives ``train/`` and ``test/``.
        size: side of the written images (>= 8).
        test_fraction: share of each digit put in ``test/``, in (0, 1).
        seed: split seed.
        overwrite: replace existing ``train/``/``test/`` folders (else FileExistsError).
    """
    if size < 8:
        raise ValueError(f"size must be >= 8 (the digits are 8x8), got {size}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    root = Path(output_dir)
    for split in ("train", "test"):
        if (root / split).exists() and any((root / split).iterdir()):
            if not overwrite:
                raise FileExistsError(f"{root / split} exists and is not empty; pass overwrite=True")
            shutil.rmtree(root / split)
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # [N, 8, 8], values 0..16 -> 0..255
    indices = np.arange(len(pixels))
    train_idx, test_idx = train_test_split(
        indices, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    for split, split_idx in (("train", train_idx), ("test", test_idx)):
        for i in sorted(split_idx):
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels[i]).resize((size, size), Image.BICUBIC).convert("RGB")
            image.save(folder / f"{i:04d}.png")
    classes = [str(c) for c in range(10)]
    return {"root": str(root), "train": len(train_idx), "test": len(test_idx), "classes": classes}
