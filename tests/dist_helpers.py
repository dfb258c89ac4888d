"""What the multi-process and SLURM tests share: shards whose labels name the samples, a clean
environment for launching the CLI in subprocesses, and a one-thread fixture."""
import os
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vit.data import write_shards

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# Variables a launcher sets: a leftover one (from a surrounding job) would change what Lightning detects.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for a test module (import it there): on a shared 2-core machine two
    threads spin against each other (10x slower), and results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Shards(NamedTuple):
    pattern: str  # brace pattern of the shards
    labels: List[List[int]]  # the labels of each shard, in stored order


def write_indexed_shards(root: Path, num_samples: int, shard_size: int) -> Shards:
    """``num_samples`` random 32x32 images, each its own class, so sample ``i`` has label ``i``;
    written as shards by :func:`ssl_vit.data.write_shards`. The labels per shard are read back from
    the tar members."""
    rng = np.random.default_rng(0)
    for i in range(num_samples):
        folder = root / "images" / f"s{i:03d}"
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "0.png")
    info = write_shards(root / "images", root / "shards", "train", shard_size=shard_size, progress=False)
    labels = []
    for name in info["shards"]:
        with tarfile.open(root / "shards" / name) as tar:
            labels.append([int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")])
    assert sorted(sum(labels, [])) == list(range(num_samples))
    return Shards(str(root / "shards" / f"train-{{000000..{len(labels) - 1:06d}}}.tar"), labels)


def clean_env(**extra: str) -> Dict[str, str]:
    """This environment without launcher, SLURM or Lightning variables, with ``tests/`` on
    PYTHONPATH (for the callbacks the runs load), wandb offline, and ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_")) and k not in LAUNCH_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env["WANDB_MODE"] = "offline"
    env.update(extra)
    return env


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_in_own_session(command: List[str], env: Dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` from the repository root in a session (and process group) of its own, as a
    batch step or a terminal job runs; on a timeout (a hung run) every process it started is killed.
    SIGINT starts at its default disposition, as in a terminal: a test suite started in the background
    (``make test &``) inherits it ignored, and Python then never turns Ctrl-C into KeyboardInterrupt."""
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, preexec_fn=_default_sigint) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous or MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun() -> List[str]:
    """The ``torchrun`` beside this interpreter (it is ``python -m torch.distributed.run``)."""
    script = Path(sys.executable).parent / "torchrun"
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


class Crops(torch.utils.data.Dataset):
    """DINO views of given images: 2 global crops (the image, its mirror) and one 16x16 local crop.
    Defined here so that spawned ranks (ddp_spawn) import it by a stable module name."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i]
        return [x, x.flip(-1), x[:, :16, :16]], -1
