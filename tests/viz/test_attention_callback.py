"""The training-time attention gallery: files per epoch in the run directory, wandb images, rank 0."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from ssl_vit.checkpoints.format import find_backbone
from ssl_vit.methods.dino import DINO
from ssl_vit.methods.mae import MAE
from ssl_vit.viz.attention import attention_maps
from ssl_vit.viz.attention_logger import AttentionGalleryLogger
from ssl_vit.viz.gallery import normalise, prepare_image
from viz_helpers import mae_layout_module, tiny_vit, wandb_trainer


class TinyDINO(pl.LightningModule):
    """Just enough of a DINO module: a student that trains and a teacher that copies it each step."""

    BACKBONES, EVAL_BACKBONE = DINO.BACKBONES, DINO.EVAL_BACKBONE

    def __init__(self) -> None:
        super().__init__()
        self.student, self.teacher = nn.Module(), nn.Module()
        self.student.backbone, self.teacher.backbone = tiny_vit(), tiny_vit()
        self.teacher.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        return self.student.backbone(batch[0]).pow(2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.teacher.backbone.load_state_dict(self.student.backbone.state_dict())

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.5)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32)), batch_size=2)


def test_gallery_per_epoch_in_the_run_directory_from_the_teacher(images, tmp_path):
    torch.manual_seed(0)
    module = TinyDINO()
    callback = AttentionGalleryLogger(str(images), every_n_epochs=2, image_size=32)
    logger = CSVLogger(tmp_path / "logs", name="run")
    trainer = pl.Trainer(
        max_epochs=4, logger=logger, callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
    )
    trainer.fit(module)
    root = Path(logger.log_dir) / "attention"
    assert sorted(p.name for p in root.iterdir()) == ["epoch_001", "epoch_003"]
    for epoch in ("epoch_001", "epoch_003"):
        assert (root / epoch / "index.html").is_file()
        assert sorted(p.name for p in (root / epoch).iterdir() if p.is_dir()) == ["cat", "dog", "owl"]
    # the last gallery shows the trained teacher's attention; the first one differs (training moved it)
    image = prepare_image(Image.open(images / "cat.png"), 32, 8)
    expected, _ = attention_maps(module.teacher.backbone, normalise(image[None]))
    last = np.load(root / "epoch_003" / "cat" / "attention.npy")
    np.testing.assert_allclose(last, expected[0].numpy(), atol=1e-6)
    assert last.shape == (2, 4, 6)
    assert not np.allclose(np.load(root / "epoch_001" / "cat" / "attention.npy"), last, atol=1e-6)
    assert module.teacher.backbone.blocks[-1].attn.fused_attn  # fused attention is back on


def test_wandb_images_and_rank_zero_only(images, tmp_path):
    pytest.importorskip("wandb")
    module = mae_layout_module()
    callback = AttentionGalleryLogger([str(images / "cat.png"), str(images / "owl.png")], image_size=32)
    callback.setup(SimpleNamespace(), module, "fit")
    wandb, trainer = wandb_trainer(tmp_path)
    calls = []
    wandb.log_image = lambda **kwargs: calls.append(kwargs)
    callback.on_train_epoch_end(trainer, module)
    assert calls == [] and not (tmp_path / "run").exists()
    trainer.is_global_zero = True
    callback.on_train_epoch_end(trainer, module)
    assert len(calls) == 1 and calls[0]["key"] == "attention" and calls[0]["step"] == 7
    assert calls[0]["caption"] == ["cat", "owl"]
    # two rows (heat maps, overlays) of image + 2 heads + mean, each 32 high
    assert [p.shape for p in calls[0]["images"]] == [(64, 4 * 48, 3), (80, 4 * 32, 3)]
    assert (tmp_path / "run" / "attention" / "epoch_000" / "owl" / "attention.npy").is_file()


def test_backbone_resolution_and_bad_images(images, tmp_path):
    module = nn.Module()
    module.backbone = tiny_vit()
    with pytest.raises(AttributeError, match="declares no evaluation backbone"):
        find_backbone(module)  # a plain module names no evaluation backbone: a path is needed
    assert find_backbone(module, "backbone") is module.backbone
    module.BACKBONES, module.EVAL_BACKBONE = {"backbone": "backbone"}, "backbone"
    assert find_backbone(module) is module.backbone
    with pytest.raises(AttributeError, match="student.backbone"):
        find_backbone(module, "student.backbone")
    # each stage declares its own: DINO's teacher, MAE's encoder
    dino = DINO(arch="vit_tiny_patch4_32", img_size=32, embed_dim=16, depth=1, num_heads=2, out_dim=8,
                head_hidden_dim=8, head_bottleneck_dim=4)
    mae = MAE(arch="vit_tiny_patch4_32", embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16,
              decoder_depth=1, decoder_num_heads=2)
    assert find_backbone(dino) is dino.teacher.backbone and find_backbone(mae, "auto") is mae.encoder.vit
    (images / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        AttentionGalleryLogger(str(images), image_size=32).setup(SimpleNamespace(), module, "fit")
    with pytest.raises(ValueError, match="every_n_epochs"):
        AttentionGalleryLogger(str(images), every_n_epochs=0)
