"""The `ssl-vit` command (also `python -m ssl_vit`).

    ssl-vit fit --config recipes/mae/vit_base_patch16_in1k.yaml [--trainer.devices 8 ...]
    ssl-vit validate --config recipes/probe/knn_cifar10.yaml
    ssl-vit demo --output runs/demo

`fit`, `validate`, `test` and `predict` are LightningCLI subcommands: the recipe names the
LightningModule and DataModule by class path, unknown keys fail at start-up naming the key, and the
resolved configuration is saved as ``config.yaml`` in the run directory. `demo` is the end-to-end
example run on scikit-learn's digits.
"""
import copy
import os
import socket
import sys
from typing import Any, List, Optional

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

from ssl_vit.methods.checks import check_resume_config


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


class SSLViTCLI(LightningCLI):
    """LightningCLI that refuses a ``--ckpt_path`` whose model differs from the recipe's: LightningCLI
    replaces the recipe's model configuration by the checkpoint's hyperparameters, so a checkpoint of
    another method or architecture would otherwise silently replace the recipe's model."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        self.recipe_model = copy.deepcopy(self.config[subcommand].get("model")) if subcommand else None

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            check_resume_config(self.recipe_model, self.config[subcommand].get("model"), str(ckpt_path))


def run_lightning(args: Optional[List[str]] = None) -> LightningCLI:
    """LightningCLI taking any LightningModule / DataModule by class path (the recipes name them)."""
    default_wandb_offline()
    return SSLViTCLI(
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
    run_lightning(None if args is None else argv)  # None: LightningCLI reads sys.argv itself (no warning)


if __name__ == "__main__":
    main()
