"""What the every-few-epochs picture loggers share: when one is due and where it writes, and the
images they are given."""
from pathlib import Path
from typing import List, Optional, Union

import pytorch_lightning as pl


def due_run_dir(trainer: pl.Trainer, every_n_epochs: int) -> Optional[Path]:
    """The run directory (``trainer.log_dir``, else ``default_root_dir``) when the training epoch
    that just ended is the ``every_n_epochs``-th and this process is global rank 0, else ``None``.

    Every rank must call it on a due epoch: ``trainer.log_dir`` is a collective.
    """
    if (trainer.current_epoch + 1) % every_n_epochs:
        return None
    run_dir = trainer.log_dir or trainer.default_root_dir
    return Path(run_dir) if trainer.is_global_zero else None


def image_inputs(images: Optional[Union[str, Path, List[str]]], owner: str) -> List[str]:
    """A logger's ``images`` argument as a list (empty: the run's own images).

    Raises:
        ValueError: naming ``owner``, for an empty list (``None`` means the run's images).
    """
    inputs = [str(images)] if isinstance(images, (str, Path)) else [str(i) for i in images or []]
    if images is not None and not inputs:
        raise ValueError(f"{owner} needs at least one image")
    return inputs
