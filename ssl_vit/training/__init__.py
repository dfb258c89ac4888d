"""Opt-in training machinery, as Lightning callbacks and strategies: the non-finite guard, start-up
checks, atomic checkpoints with exact resume, preemption (SLURM requeue), the k-NN monitor, a progress
bar that moves on slow steps, and FSDP
for ViT-L/H (``strategies``). `ssl-vit` always adds ``NonFiniteGuard`` and ``StartupChecks``."""
from ssl_vit.training.checkpoint import Checkpoint
from ssl_vit.training.checks import StartupChecks
from ssl_vit.training.knn_monitor import KNNMonitor
from ssl_vit.training.nonfinite import NonFiniteError, NonFiniteGuard
from ssl_vit.training.preemption import Preemption
from ssl_vit.training.progress import ProgressBar

__all__ = ["Checkpoint", "KNNMonitor", "NonFiniteError", "NonFiniteGuard", "Preemption", "ProgressBar", "StartupChecks"]
