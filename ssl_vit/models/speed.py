"""Per-block speed and memory switches shared by the pretraining methods.

* ``compile``: ``torch.compile`` each Transformer block in place (``nn.Module.compile``), so the
  state-dict keys do not change. Every block shares one compiled graph per input shape: MAE has one
  shape (the visible tokens), DINO two (global and local crops).
* ``grad_checkpointing``: recompute each block's activations in the backward pass instead of storing
  them (timm's ``set_grad_checkpointing``; ``MaskedViT`` honours it too): about a third more compute
  for activation memory that no longer grows with depth. For ViT-L/H at large batches.
"""
from typing import Iterable

from torch import nn


def configure_blocks(
    vit: nn.Module, compile: bool = False, grad_checkpointing: bool = False, extra_blocks: Iterable[nn.Module] = ()
) -> None:
    """Apply the switches to a timm ViT (and ``compile`` to ``extra_blocks``, e.g. a decoder's).

    Args:
        vit: a timm ``VisionTransformer`` (has ``blocks`` and ``set_grad_checkpointing``).
        compile: compile every block of ``vit`` and every module of ``extra_blocks``.
        grad_checkpointing: recompute ``vit``'s blocks in backward.
        extra_blocks: more modules to compile (never checkpointed).
    """
    if grad_checkpointing:
        vit.set_grad_checkpointing(True)
    if compile:
        for block in list(vit.blocks) + list(extra_blocks):
            block.compile()
