"""Lightning callbacks: monitors that watch a run without changing it, the checkpoint writer, and
the preemption handler (save at a step boundary, requeue, stop)."""
from ssl_vit.callbacks.attention import AttentionGalleryLogger  # noqa: F401
from ssl_vit.callbacks.checkpoint import Checkpoint  # noqa: F401
from ssl_vit.callbacks.knn import KNNMonitor  # noqa: F401
from ssl_vit.callbacks.preemption import Preemption  # noqa: F401
from ssl_vit.callbacks.reconstruction import ReconstructionLogger  # noqa: F401
