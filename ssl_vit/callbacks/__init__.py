"""Lightning callbacks: monitors that watch a run without changing it."""
from ssl_vit.callbacks.attention import AttentionGalleryLogger  # noqa: F401
from ssl_vit.callbacks.knn import KNNMonitor  # noqa: F401
from ssl_vit.callbacks.reconstruction import ReconstructionLogger  # noqa: F401
