"""Lightning callbacks: monitors that watch a run without changing it."""
from ssl_vit.callbacks.reconstruction import ReconstructionLogger  # noqa: F401
