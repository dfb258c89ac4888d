"""No code runs from data or checkpoints.

Every payload is an object whose unpickling creates a marker file; each test first shows that the
payload is live (an unsafe load does create the file), then that ssl_vit's readers never create it.
The ``.pyd`` member read through ShardDataModule loaders and a payload in a plain state dict read by
``load_backbone`` are also tested in tests/data/test_data_pipeline.py and tests/checkpoints/test_load.py.
"""
import io
import json
import pathlib
import pickle
import runpy
import tarfile
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from ssl_vit.checkpoints.load import load_backbone
from ssl_vit.checkpoints.mae import load_mae
from ssl_vit.cli import main as cli_main
from ssl_vit.data import EvalTransform, PretrainTransform, ShardDataModule
from ssl_vit.methods.finetune import Finetune
from ssl_vit.methods.knn import KNNEval
from ssl_vit.methods.mae import MAE
from ssl_vit.methods.probe import LinearProbe

ROOT = Path(__file__).resolve().parents[2]
TINY_MAE = dict(arch="vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2, warmup_epochs=0)


class Touch:
    """Unpickling this creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def assert_live(tmp_path: Path) -> None:
    """The payload does run when unpickled without restriction."""
    probe = tmp_path / "live"
    pickle.loads(pickle.dumps(Touch(probe)))
    assert probe.exists()


# -- shards ---------------------------------------------------------------------------------------
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


@pytest.fixture
def hostile_shards(tmp_path) -> Path:
    """Two shards of 8 samples of 32x32 JPEGs. Every sample also carries a pickle payload under a
    suffix a generic webdataset decoder would unpickle or ``torch.load`` (.pyd, .pickle, .pth, .pt);
    sample 3 has a pickle instead of its JPEG, sample 12 a pickle instead of its ``.cls``."""
    rng = np.random.default_rng(0)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Touch(marker))
    torch_payload = io.BytesIO()
    torch.save({"x": Touch(marker)}, torch_payload)
    suffixes = {"pyd": payload, "pickle": payload, "pth": torch_payload.getvalue(), "pt": torch_payload.getvalue()}
    for shard in range(2):
        with tarfile.open(tmp_path / f"evil-{shard:06d}.tar", "w") as tar:
            for i in range(8 * shard, 8 * shard + 8):
                jpeg = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
                _add(tar, f"{i:04d}.cls", payload if i == 12 else str(i % 2).encode())
                _add(tar, f"{i:04d}.jpg", payload if i == 3 else jpeg.getvalue())
                for suffix, data in suffixes.items():
                    _add(tar, f"{i:04d}.{suffix}", data)
    info = {"num_samples": 16, "shards": ["evil-000000.tar", "evil-000001.tar"], "shard_samples": [8, 8],
            "classes": ["a", "b"]}
    (tmp_path / "evil.json").write_text(json.dumps(info))
    return tmp_path


class Counter(pl.LightningModule):
    """Counts the training samples and their labels (a linear layer keeps the optimiser busy)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(3, 2)
        self.labels: list = []

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        self.labels += labels.tolist()
        return torch.nn.functional.cross_entropy(self.net(images.mean((2, 3))), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_shard_with_pickle_members_trains_and_never_unpickles(hostile_shards, tmp_path):
    assert_live(tmp_path)
    dm = ShardDataModule(str(hostile_shards / "evil-{000000..000001}.tar"), batch_size=4, num_workers=2,
                         train_transform=EvalTransform(32, crop_pct=1.0), max_corrupt_fraction=0.2, pin_memory=False)
    module = Counter()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 4 and len(module.labels) == 16  # whole batches: corrupt samples replaced
    assert set(module.labels) == {0, 1}
    assert not (hostile_shards / "pwned").exists()


# -- checkpoints ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evil_ckpt(tmp_path_factory) -> tuple:
    """An MAE checkpoint as ssl_vit writes it (state dict, metadata, hyperparameters), plus a payload."""
    tmp = tmp_path_factory.mktemp("evil_ckpt")
    module = MAE(**TINY_MAE)
    checkpoint = {"state_dict": module.state_dict(), "pytorch-lightning_version": pl.__version__, "epoch": 0,
                  "global_step": 0, "hyper_parameters": {"_class_path": "ssl_vit.methods.mae.MAE", **module.hparams}}
    module.on_save_checkpoint(checkpoint)
    marker = tmp / "pwned"
    checkpoint["callbacks"] = {"x": Touch(marker)}
    torch.save(checkpoint, tmp / "evil.ckpt")
    torch.load(tmp / "evil.ckpt", weights_only=False)  # the payload is live
    assert marker.exists()
    marker.unlink()
    return str(tmp / "evil.ckpt"), marker


LOADERS = {
    "load_backbone": lambda path, out: load_backbone(path),
    "load_mae": lambda path, out: load_mae(path),
    "probe": lambda path, out: LinearProbe(weights=path),
    "finetune": lambda path, out: Finetune(weights=path),
    "knn": lambda path, out: KNNEval(weights=path),
    "export_tool": lambda path, out: runpy.run_path(str(ROOT / "tools/export_backbone.py"))["main"](
        ["--weights", path, "--output", str(out)]),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_checkpoint_payload_is_refused_by_every_loader(loader, evil_ckpt, tmp_path):
    path, marker = evil_ckpt
    with pytest.raises(ValueError, match="cannot be read as a weights-only checkpoint"):
        LOADERS[loader](path, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_cli_resume_refuses_the_payload(evil_ckpt, tmp_path, capsys):
    path, marker = evil_ckpt
    # refused before Lightning opens it, naming the pickled objects (torch's own message advised
    # weights_only=False, i.e. running them)
    with pytest.raises(ValueError, match=r"--ckpt_path: .*evil\.ckpt cannot be read as a weights-only checkpoint: it "
                                         r"holds pickled objects other than tensors .*pathlib"):
        cli_main(["fit", "--config", str(ROOT / "ssl_vit/recipes/smoke/mae.yaml"), "--data.train", "unused-{000000..000001}.tar",
                  "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", path])
    assert not marker.exists()


def test_lightning_resume_refuses_the_payload(evil_ckpt, tmp_path, monkeypatch):
    """``Trainer.fit(ckpt_path=...)`` loads through Lightning's CheckpointIO: weights-only since
    Lightning 2.6 leaves the default to torch (>= 2.6: weights-only). Lightning 2.4 / 2.5 passed
    ``weights_only=False`` and would run the payload; so does torch with
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``."""
    path, marker = evil_ckpt
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    data = tmp_path / "data"
    (data / "c0").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(data / "c0" / "0.png")
    from ssl_vit.data import ImageFolderDataModule

    dm = ImageFolderDataModule(str(data), batch_size=1, num_workers=0, pin_memory=False, train_transform=PretrainTransform(32))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer.fit(MAE(**TINY_MAE), datamodule=dm, ckpt_path=path)
    assert not marker.exists() and trainer.global_step == 0
