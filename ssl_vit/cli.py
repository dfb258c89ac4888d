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

wandb follows its own ``WANDB_MODE`` (``offline`` writes a run to sync later); nothing here probes
the network.
"""
import copy
import warnings
from typing import Any, List, Optional

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

from ssl_vit.training.checks import StartupChecks, check_resume_config
from ssl_vit.training.nonfinite import NonFiniteGuard


class SSLViTCLI(LightningCLI):
    """LightningCLI with the always-on callbacks, and refusing a ``--ckpt_path`` whose model differs
    from the recipe's: LightningCLI replaces the recipe's model configuration by the checkpoint's
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
        subcommand = self.config.get("subcommand")
        self.recipe_model = copy.deepcopy(self.config[subcommand].get("model")) if subcommand else None

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            check_resume_config(self.recipe_model, self.config[subcommand].get("model"), str(ckpt_path))


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
