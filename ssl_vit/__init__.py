"""ssl_vit: self-supervised pretraining (MAE, DINO) of timm Vision Transformers with Lightning.

The public API is imported lazily so that ``import ssl_vit`` stays cheap::

    ssl_vit.create_backbone("vit_small_patch16", img_size=224)
    ssl_vit.load_backbone("teacher.ckpt")
    ssl_vit.load_mae("mae_pretrain_vit_base.pth")
    ssl_vit.self_attention(model, images)
"""
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_backbone": "ssl_vit.models.backbone",
    "load_backbone": "ssl_vit.checkpoints.load",
    "load_mae": "ssl_vit.checkpoints.mae",
    "self_attention": "ssl_vit.viz.attention",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ssl_vit' has no attribute {name!r}")
