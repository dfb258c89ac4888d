"""The training-time attention-distance plots: files per epoch in the run directory, wandb images, rank 0."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from ssl_vit.viz.attention_distance import measure_attention_distance
from ssl_vit.viz.attention_distance_logger import AttentionDistanceLogger
from ssl_vit.viz.images import prepare_image
from viz_helpers import mae_layout_module, tiny_vit, wandb_trainer


class Trains(pl.LightningModule):
    """A backbone that a few SGD steps move."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = tiny_vit()

    def training_step(self, batch, batch_idx):
        return self.backbone(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32)), batch_size=2)


def test_plots_per_epoch_in_the_run_directory(images, tmp_path):
    torch.manual_seed(0)
    module = Trains()
    callback = AttentionDistanceLogger(str(images), every_n_epochs=2, image_size=32, backbone="backbone")
    logger = CSVLogger(tmp_path / "logs", name="run")
    trainer = pl.Trainer(max_epochs=4, logger=logger, callbacks=[callback], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         accelerator="cpu")
    trainer.fit(module)
    root = Path(logger.log_dir) / "attention_distance"
    assert sorted(p.name for p in root.iterdir()) == ["epoch_001", "epoch_003"]
    for epoch in ("epoch_001", "epoch_003"):
        assert {p.name for p in (root / epoch).iterdir()} == {"attention_distance.json", "attention_distance.png",
                                                              "attention_entropy.png"}
    # the last measurement is the trained backbone's, on the three images
    tensors = [prepare_image(Image.open(images / f"{n}.png"), 32, 8) for n in ("cat", "dog", "owl")]
    expected = measure_attention_distance(module.backbone, tensors)
    last = json.loads((root / "epoch_003" / "attention_distance.json").read_text())
    assert last["images"] == 3
    np.testing.assert_allclose([layer["distance_px"] for layer in last["layers"]], expected.distance.numpy(), rtol=1e-6)
    first = json.loads((root / "epoch_001" / "attention_distance.json").read_text())
    assert first["layers"] != last["layers"]  # training moved it
    assert module.backbone.blocks[-1].attn.fused_attn  # fused attention is back on


def test_wandb_images_and_rank_zero_only(images, tmp_path):
    pytest.importorskip("wandb")
    module = mae_layout_module()
    callback = AttentionDistanceLogger([str(images / "cat.png"), str(images / "owl.png")], image_size=32)
    callback.setup(SimpleNamespace(), module, "fit")
    wandb, trainer = wandb_trainer(tmp_path)
    images_logged, metrics = [], []
    wandb.log_image = lambda **kwargs: images_logged.append(kwargs)
    wandb.log_metrics = lambda values, step: metrics.append((values, step))
    callback.on_train_epoch_end(trainer, module)
    assert images_logged == [] and not (tmp_path / "run").exists()
    trainer.is_global_zero = True
    callback.on_train_epoch_end(trainer, module)
    assert len(images_logged) == 1 and images_logged[0]["key"] == "attention_distance"
    assert images_logged[0]["caption"] == ["attention_distance", "attention_entropy"] and images_logged[0]["step"] == 7
    assert all(p.ndim == 3 and p.shape[2] == 3 for p in images_logged[0]["images"])
    assert metrics[0][1] == 7 and sorted(metrics[0][0]) == ["attention_distance/layer_0", "attention_distance/layer_1"]
    assert (tmp_path / "run" / "attention_distance" / "epoch_000" / "attention_distance.png").is_file()


def test_bad_arguments_and_images(images):
    module = nn.Module()
    module.backbone = tiny_vit()
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
        AttentionDistanceLogger(str(images), every_n_epochs=0)
    (images / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot use .*broken.png"):
        AttentionDistanceLogger(str(images), image_size=32, backbone="backbone").setup(SimpleNamespace(), module, "fit")
