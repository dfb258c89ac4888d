"""Shared by the viz tests."""
import numpy as np
import pytest
from PIL import Image


@pytest.fixture()
def images(tmp_path):
    """A folder of three random RGB images of different sizes (cat 48x32, dog 32x32, owl 32x40)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fixed"
    root.mkdir()
    for name, size in [("cat", (48, 32)), ("dog", (32, 32)), ("owl", (32, 40))]:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"{name}.png")
    return root
