"""Test-suite wiring: the shared helpers at the top of tests/ (golden.py, dist_helpers.py ...) are
importable from every sub-folder, which mirror the package (tests/methods/ for ssl_vit/methods/ ...),
and the fast tier.

``make test-fast`` (``pytest -m "not slow"``) runs every module's unit tests in under two minutes on
two cores; a test that trains through the CLI, spawns processes or runs an end-to-end chain is marked
``slow`` (by its module's ``pytestmark`` or its own marker) and runs in ``make test`` only.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_vit.data import write_shards

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: multi-process, CLI-training or end-to-end tests (make test only)")


@pytest.fixture(scope="module")
def two_class_shards(tmp_path_factory) -> str:
    """8 random 32x32 PNGs in 2 classes as 2 shards of 4; their brace pattern."""
    tmp = tmp_path_factory.mktemp("two_class_shards")
    rng = np.random.default_rng(0)
    for i in range(8):
        folder = tmp / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    write_shards(tmp / "images", tmp / "shards", "train", shard_size=4, progress=False)
    return str(tmp / "shards" / "train-{000000..000001}.tar")
