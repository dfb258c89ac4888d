"""Shared by the attention callback tests (tests/viz): a tiny backbone, a module in MAE's layout, and a
trainer stand-in at the end of epoch 0 (step 7) that logs to an offline wandb logger."""
from pathlib import Path
from types import SimpleNamespace
from typing import Tuple

from pytorch_lightning.loggers import WandbLogger
from torch import nn

from ssl_vit.methods.mae import MAE
from ssl_vit.models.backbone import create_backbone


def tiny_vit() -> nn.Module:
    return create_backbone("vit_tiny_patch8_32", img_size=32, embed_dim=32, depth=2, num_heads=2)


def mae_layout_module() -> nn.Module:
    """A plain module holding a tiny ViT where MAE holds its encoder, declaring MAE's backbones."""
    module = nn.Module()
    module.encoder = nn.Module()
    module.encoder.vit = tiny_vit()
    module.BACKBONES, module.EVAL_BACKBONE = MAE.BACKBONES, MAE.EVAL_BACKBONE
    return module


def wandb_trainer(tmp_path: Path) -> Tuple[WandbLogger, SimpleNamespace]:
    """An offline wandb logger and a trainer stand-in using it, not global rank 0 (set
    ``trainer.is_global_zero``); the run folder is ``tmp_path / "run"``."""
    wandb = WandbLogger(offline=True, save_dir=str(tmp_path))
    trainer = SimpleNamespace(current_epoch=0, global_step=7, loggers=[wandb], log_dir=str(tmp_path / "run"),
                              default_root_dir=str(tmp_path), is_global_zero=False)
    return wandb, trainer
