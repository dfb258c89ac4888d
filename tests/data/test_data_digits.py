"""export_digits writes scikit-learn's digits as an ImageFolder tree."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from ssl_vit.data import export_digits


def test_export_digits(tmp_path):
    info = export_digits(tmp_path / "digits", size=16, test_fraction=0.2, seed=0)
    assert info["train"] + info["test"] == 1797 and info["test"] == 360
    assert info["classes"] == [str(d) for d in range(10)]
    digits = load_digits()
    files = {split: sorted((tmp_path / "digits" / split).glob("*/*.png")) for split in ("train", "test")}
    assert len(files["train"]) == info["train"] and len(files["test"]) == info["test"]
    ids = {split: {int(p.stem) for p in fs} for split, fs in files.items()}
    assert ids["train"].isdisjoint(ids["test"]) and len(ids["train"] | ids["test"]) == 1797
    for digit in range(10):  # stratified: every digit ~20% in test
        n_test = len(list((tmp_path / "digits" / "test" / str(digit)).glob("*.png")))
        assert abs(n_test - 0.2 * np.sum(digits.target == digit)) <= 1
    path = files["test"][5]
    assert int(path.parent.name) == digits.target[int(path.stem)]
    image = Image.open(path)
    assert image.mode == "RGB" and image.size == (16, 16)
    original = np.round(digits.images[int(path.stem)] * 255 / 16).astype(np.uint8)
    pixels = np.asarray(image)[..., 0]
    expect = np.asarray(Image.fromarray(original).resize((16, 16), Image.BICUBIC))  # the 8x8 digit, upscaled
    np.testing.assert_array_equal(pixels, expect)
    assert np.all(pixels == np.asarray(image)[..., 1])  # grey: the same in every channel
    with pytest.raises(FileExistsError, match="overwrite"):
        export_digits(tmp_path / "digits")
    again = export_digits(tmp_path / "digits", size=8, seed=1, overwrite=True)
    assert sorted(Path(tmp_path / "digits" / "train").glob("*/*.png")) != files["train"]
    assert again["test"] == 360
