"""The LightningCLI behind `ssl-vit fit|validate|test|predict` (the apps add `ssl-vit demo`).

    ssl-vit fit --config recipes/mae/vit_base_patch16_in1k.yaml [--trainer.devices 8 ...]
    ssl-vit validate --config recipes/probe/knn_cifar10.yaml

The recipe names the LightningModule and DataModule by class path, unknown keys fail at start-up
naming the key, and the resolved configuration is saved as ``config.yaml`` in the run directory.
Two callbacks are always added, each configured by its own section of the recipe:

* ``nonfinite`` (``ssl_vit.training.NonFiniteGuard``): steps with a non-finite loss or gradient are
  skipped on the device (``policy: skip|stop``, ``max_skipped_steps``, ``check_every``);
* ``startup_checks`` (``ssl_vit.training.StartupChecks``): empty data and image sizes that are not
  multiples of the patch size fail before any compute.

Precision follows the device: recipes ask for ``bf16-mixed`` (fast on GPUs), and where the run lands
on a device without fast bf16 (a CPU, a GPU older than Ampere) it trains in fp32 and says so in one
line, unless ``--trainer.precision`` is given on the command line (on a CPU, bf16 autocast made one
DINO ViT-S/4 step 24x slower than fp32).

wandb follows its own ``WANDB_MODE`` (``offline`` writes a run to sync later); nothing here probes
the network.
"""
import copy
import sys
import warnings
from typing import Any, List, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI

from ssl_vit.training.checks import StartupChecks, check_resume_config, check_resume_file
from ssl_vit.training.nonfinite import NonFiniteGuard


class SSLViTCLI(LightningCLI):
    """LightningCLI with the always-on callbacks, refusing a ``--ckpt_path`` file that cannot be read
    (one message per kind: ``check_resume_file``), and one whose model differs from the recipe's: LightningCLI replaces the recipe's model configuration by the checkpoint's
    hyperparameters, so a checkpoint of another method or architecture would otherwise silently
    replace the recipe's model."""

    def init_parser(self, **kwargs: Any) -> Any:
        """Every parser refuses abbreviations: ``--trainer.max_step`` is an error, not ``max_steps``."""
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_lightning_class_args(StartupChecks, "startup_checks")

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The trainer, with the non-finite guard first among the callbacks: its end-of-step
        roll-back must happen before any other callback (Preemption, recorders) reads the state."""
        trainer = super().instantiate_trainer(**kwargs)
        guards = [c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)]
        trainer.callbacks = guards + [c for c in trainer.callbacks if not isinstance(c, NonFiniteGuard)]
        return trainer

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        self.command_line = [str(a) for a in (sys.argv[1:] if args is None else args)] if not isinstance(args, dict) else []
        subcommand = self.config.get("subcommand")
        self.recipe_model = copy.deepcopy(self.config[subcommand].get("model")) if subcommand else None
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:  # before LightningCLI opens it to read its hyperparameters
            check_resume_file(str(ckpt_path))

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path:
            check_resume_config(self.recipe_model, self.config[subcommand].get("model"), str(ckpt_path))
        trainer = self.config[subcommand].get("trainer")
        if trainer is not None:
            explicit = any(a.startswith("--trainer.precision") for a in self.command_line)
            precision = precision_for_device(trainer.get("precision"), trainer.get("accelerator"), explicit)
            if precision != trainer.get("precision"):
                print(f"ssl-vit: {trainer.get('precision')} asked for, but this device has no fast bf16: training "
                      f"in fp32 ({precision}); pass --trainer.precision to insist", file=sys.stderr)
                trainer["precision"] = precision


def has_fast_bf16(accelerator: Optional[str]) -> bool:
    """Whether the device a run lands on computes bf16 fast: a GPU with native bf16 (Ampere or
    later); never a CPU (bf16 autocast there is emulated for most operations)."""
    if accelerator in ("cpu",):
        return False
    if accelerator in ("gpu", "cuda", "auto", None):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return True  # other accelerators (TPU, ...): as asked


def precision_for_device(precision: Any, accelerator: Optional[str], explicit: bool) -> Any:
    """``precision``, or ``"32-true"`` where a recipe's bf16 would land on a device without fast bf16
    (unless the command line gave the precision explicitly)."""
    if explicit or not str(precision).startswith("bf16") or has_fast_bf16(accelerator):
        return precision
    return "32-true"


def run_lightning(args: Optional[List[str]] = None) -> LightningCLI:
    """LightningCLI taking any LightningModule / DataModule by class path (the recipes name them)."""
    # DINO's device-side augmentation overrides on_after_batch_transfer on purpose; Lightning warns
    # whenever a module does so while a DataModule is used. Silenced for the command, not on import.
    warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer` in `LightningModule`.*")
    return SSLViTCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: Optional[List[str]] = None) -> None:
    run_lightning(None if args is None else list(args))  # None: LightningCLI reads sys.argv itself (no warning)


if __name__ == "__main__":
    main()
