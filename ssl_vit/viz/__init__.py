"""Looking at models: attention maps (self-attention, rollout, masks), the HTML gallery, MAE
reconstructions, and the callbacks that log them during training."""
from ssl_vit.viz.attention_logger import AttentionGalleryLogger
from ssl_vit.viz.reconstruction_logger import ReconstructionLogger

__all__ = ["AttentionGalleryLogger", "ReconstructionLogger"]
