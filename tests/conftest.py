"""Test-suite wiring: the shared helpers at the top of tests/ (golden.py, dist_helpers.py ...) are
importable from every sub-folder, which mirror the package (tests/methods/ for ssl_vit/methods/ ...),
and the fast tier.

``make test-fast`` (``pytest -m "not slow"``) runs every module's unit tests in under two minutes on
two cores; a test that trains through the CLI, spawns processes or runs an end-to-end chain is marked
``slow`` (by its module's ``pytestmark`` or its own marker) and runs in ``make test`` only.
"""
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: multi-process, CLI-training or end-to-end tests (make test only)")
