"""The `ssl-vit` command (also `python -m ssl_vit`).

    ssl-vit fit --config recipes/mae/vit_base_patch16_in1k.yaml [--trainer.devices 8 ...]
    ssl-vit validate --config recipes/probe/knn_cifar10.yaml
    ssl-vit demo --output runs/demo

`fit`, `validate`, `test` and `predict` are LightningCLI subcommands: the recipe names the
LightningModule and DataModule by class path, unknown keys fail at start-up naming the key, and the
resolved configuration is saved as ``config.yaml`` in the run directory. `demo` is the end-to-end
example run on scikit-learn's digits.
"""
import os
import socket
import sys
from typing import List, Optional

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI


def _network_reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def default_wandb_offline() -> None:
    """Let wandb write an offline run when it cannot reach its server, instead of hanging at start.

    An explicit ``WANDB_MODE`` is always respected.
    """
    if "WANDB_MODE" not in os.environ and not _network_reachable():
        os.environ["WANDB_MODE"] = "offline"
        print("ssl-vit: wandb server unreachable, logging offline (sync later with `wandb sync`)", file=sys.stderr)


def run_lightning(args: Optional[List[str]] = None) -> LightningCLI:
    """LightningCLI taking any LightningModule / DataModule by class path (the recipes name them)."""
    default_wandb_offline()
    return LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "demo":
        from ssl_vit.demo import main as demo_main

        demo_main(argv[1:])
        return
    run_lightning(argv)


if __name__ == "__main__":
    main()
