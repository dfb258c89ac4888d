"""A wheel built from this tree, installed into a fresh venv outside the checkout: the `ssl-vit`
commands work with only the installed package (recipes included), and the README's "your own images
in five commands" chain runs on CPU with tiny settings.

Nothing is downloaded: the wheel is built without build isolation and installed without
dependencies; the new venv sees this interpreter's packages (torch, Lightning, timm ...) through a
``.pth`` file placed after its own site-packages, so ``ssl_vit`` itself can only come from the wheel.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path
from typing import List

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # builds a wheel, makes a venv, trains and predicts in child processes

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The ``bin`` folder of a fresh venv holding the wheel built from the tree."""
    tmp = tmp_path_factory.mktemp("package")
    source = tmp / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "ssl_vit", source / "ssl_vit", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(source)], tmp)
    wheel = next((tmp / "dist").glob("ssl_vit-*.whl"))
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).strip())
    (purelib / "outer_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(pip + ["--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], tmp)
    where = _run([str(python), "-c", "import ssl_vit; print(ssl_vit.__file__)"], tmp)
    assert Path(where.strip()).is_relative_to(purelib), where  # the wheel's copy, not the checkout's
    return env_dir / "bin"


def _run(command: List[str], cwd: Path) -> str:
    """Run a command outside the checkout with no PYTHONPATH; its stdout (fails with its output)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SSL_VIT_TRACEBACK")}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def _images(folder: Path, count: int, classes: int = 0) -> None:
    """``count`` random 32x32 images, flat or (``classes`` > 0) in class folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        where = folder / f"c{i % classes}" if classes else folder
        where.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(where / f"img{i:03d}.png")


FIT = ["--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--data.num_workers", "0"]
PREDICT = ["--data.val_transform.init_args.size", "32", "--data.num_workers", "0", "--data.batch_size", "4",
           "--trainer.accelerator", "cpu"]


def test_the_installed_commands_run_from_anywhere(installed, tmp_path):
    ssl_vit = str(installed / "ssl-vit")
    listing = _run([ssl_vit, "--help"], tmp_path)
    assert all(name in listing for name in ("fit", "predict", "demo", "make-shards", "export", "quality"))
    assert "--output" in _run([ssl_vit, "demo", "--help"], tmp_path)  # the demo's recipes are in the wheel
    _images(tmp_path / "images", 8, classes=2)
    _run([ssl_vit, "make-shards", "--input", "images", "--output", "shards", "--split", "train", "--shard-size", "4",
          "--no-progress"], tmp_path)
    assert json.loads((tmp_path / "shards" / "train.json").read_text())["num_samples"] == 8
    _run([ssl_vit, "fit", "--config", "smoke/dino", "--data.train", "shards/train-{000000..000001}.tar",
          "--trainer.default_root_dir", "run", *FIT], tmp_path)  # the packaged smoke recipe, by name
    assert list((tmp_path / "run").rglob("*.ckpt"))


def test_your_own_images_in_five_commands(installed, tmp_path):
    """The README's chain, in its order: demo, shard a flat folder of unlabelled photos, pretrain a few
    steps, dump features with predict, export for timm."""
    ssl_vit = str(installed / "ssl-vit")
    _run([ssl_vit, "demo", "--help"], tmp_path)
    _images(tmp_path / "photos", 8)  # no class folders
    _run([ssl_vit, "make-shards", "--input", "photos", "--output", "shards", "--split", "train", "--shard-size", "4",
          "--no-progress"], tmp_path)
    assert json.loads((tmp_path / "shards" / "train.json").read_text())["classes"] == []
    _run([ssl_vit, "fit", "--config", "smoke/mae", "--data.train", "shards/train-{000000..000001}.tar",
          "--trainer.default_root_dir", "pretrain", *FIT], tmp_path)
    checkpoint = next((tmp_path / "pretrain").rglob("*.ckpt"))
    _run([ssl_vit, "predict", "--config", "predict/features", "--ckpt_path", str(checkpoint),
          "--data.train", "shards/train-{000000..000001}.tar", "--trainer.default_root_dir", "features", *PREDICT],
         tmp_path)
    manifest = json.loads((tmp_path / "features" / "features" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 8 and set(manifest["features"]) == {"cls", "avg"}
    _run([ssl_vit, "export", "--weights", str(checkpoint), "--output", "exported"], tmp_path)
    # timm alone (in the installed venv) loads the export and gives the pretrained backbone's features
    check = (
        "import sys, timm, torch\n"
        "from ssl_vit.checkpoints.load import load_backbone\n"
        "model = timm.create_model('local-dir:exported', pretrained=True).eval()\n"
        "source = load_backbone(sys.argv[1]).eval()\n"
        "x = torch.randn(2, 3, 32, 32)\n"
        "with torch.no_grad():\n"
        "    assert torch.allclose(model(x), source(x), atol=1e-5), (model(x) - source(x)).abs().max()\n"
        "print('equal')\n"
    )
    assert _run([str(installed / "python"), "-c", check, str(checkpoint)], tmp_path).strip() == "equal"
