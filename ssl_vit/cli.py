"""The LightningCLI behind `ssl-vit fit|validate|predict` (the apps add `ssl-vit demo` and the rest).

    ssl-vit fit --config mae/vit_base_patch16_in1k [--trainer.devices 8 ...]
    ssl-vit validate --config probe/knn_vit_small_patch4_cifar10.yaml
    ssl-vit predict --config predict/features --ckpt_path last.ckpt --data.train SHARDS

``--config`` takes a file, or the name of a recipe shipped in the package (``ssl_vit.recipes``; a
file that exists wins). ``test`` is not offered (no stage has a test split: the k-NN, probe and
finetune stages report held-out accuracy under ``validate`` / ``fit``), nor are ``--optimizer`` and
``--lr_scheduler``: each method builds its own optimiser and schedules from its arguments.
``predict`` writes features (``ssl_vit.methods.features``); its ``--ckpt_path`` takes any backbone file
``load_backbone`` reads and becomes the extractor's ``--model.weights``.

Run folders follow ``trainer.default_root_dir``: in a recipe, ``${trainer.default_root_dir}`` in any
string (a checkpoint ``dirpath``, a logger's ``save_dir``) is replaced by its value before anything
is built, so ``--trainer.default_root_dir runs/try2`` moves checkpoints and logs together.

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
import os
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence, Set

import pytorch_lightning as pl
import torch
from jsonargparse import Namespace
from pytorch_lightning.cli import LightningCLI

from ssl_vit.recipes import find_recipe
from ssl_vit.training.checkpoint import Checkpoint
from ssl_vit.training.checks import StartupChecks, check_resume_config, check_resume_file
from ssl_vit.training.nonfinite import NonFiniteGuard
from ssl_vit.training.preemption import Preemption


class SSLViTCLI(LightningCLI):
    """LightningCLI with the always-on callbacks, refusing a ``--ckpt_path`` file that cannot be read
    (one message per kind: ``check_resume_file``), and one whose model differs from the recipe's: LightningCLI replaces the recipe's model configuration by the checkpoint's
    hyperparameters, so a checkpoint of another method or architecture would otherwise silently
    replace the recipe's model."""

    @staticmethod
    def subcommands() -> Dict[str, Set[str]]:
        """LightningCLI's subcommands less ``test``: no stage defines a test split or ``test_step``."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name != "test"}

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
        add_ctrl_c_checkpoint(trainer)
        return trainer

    def parse_arguments(self, parser: Any, args: Any) -> None:
        if args is None:  # LightningCLI's own parse of sys.argv, with the recipe names resolved
            self.config = parser.parse_args(resolve_config_args(sys.argv[1:]))
        else:
            super().parse_arguments(parser, args if isinstance(args, dict) else resolve_config_args(args))
        self.command_line = [str(a) for a in (sys.argv[1:] if args is None else args)] if not isinstance(args, dict) else []
        subcommand = self.config.get("subcommand")
        if subcommand == "predict":
            route_predict_checkpoint(self.config[subcommand])
        self.recipe_model = copy.deepcopy(self.config[subcommand].get("model")) if subcommand else None
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:  # before LightningCLI opens it to read its hyperparameters
            check_resume_file(str(ckpt_path))

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        fill_root_dir(self.config[subcommand])
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


def resolve_config_args(args: Sequence[Any]) -> List[str]:
    """``args`` with every ``--config NAME`` (or ``--config=NAME``) that names no file replaced by
    the packaged recipe's path (:func:`ssl_vit.recipes.find_recipe`). Inline YAML (``--config
    '{...}'``) passes unchanged."""
    out = [str(a) for a in args]
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + _recipe_or_inline(arg[len("--config="):])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = _recipe_or_inline(out[i + 1])
    return out


def _recipe_or_inline(value: str) -> str:
    inline = any(c in value for c in "{}\n") or ": " in value
    return value if inline else str(find_recipe(value))


ROOT_DIR = "${trainer.default_root_dir}"


def route_predict_checkpoint(section: Namespace) -> None:
    """``ssl-vit predict --ckpt_path FILE`` with a model that takes ``weights`` (the feature
    extractor): FILE is the backbone to read, in any format ``load_backbone`` reads, not a Lightning
    checkpoint of the extractor to restore, so it becomes ``model.init_args.weights``.

    Raises:
        ValueError: both ``--ckpt_path`` and ``--model.weights`` name a file.
    """
    ckpt, init_args = section.get("ckpt_path"), section.get("model.init_args")
    if not ckpt or init_args is None or "weights" not in init_args:
        return
    if init_args.weights not in (None, str(ckpt)):
        raise ValueError(f"predict: --ckpt_path {ckpt} and --model.weights {init_args.weights} both name the weights; "
                         "give one")
    init_args.weights, section.ckpt_path = str(ckpt), None


def fill_root_dir(section: Namespace) -> None:
    """Replace ``${trainer.default_root_dir}`` in every string of a subcommand's configuration by the
    trainer's ``default_root_dir`` (Lightning's default: the working directory), in place."""
    root = str(section.get("trainer.default_root_dir") or os.getcwd())

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(ROOT_DIR, root)
        if isinstance(value, Namespace):
            for key, item in vars(value).items():
                setattr(value, key, fill(item))
            return value
        if isinstance(value, dict):
            return {key: fill(item) for key, item in value.items()}
        if isinstance(value, list):
            return [fill(item) for item in value]
        return value

    fill(section)


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


def add_ctrl_c_checkpoint(trainer: pl.Trainer) -> None:
    """A run that keeps resume checkpoints answers Ctrl-C by saving one: where the callbacks hold a
    :class:`~ssl_vit.training.checkpoint.Checkpoint` with ``save_last`` and no :class:`~ssl_vit.training.preemption.Preemption`,
    add ``Preemption(signals=["SIGINT"], requeue=False)``. The first Ctrl-C then writes ``last.ckpt`` at
    the next step boundary (within ``check_every`` steps on several processes) and the run exits 0;
    a second one stops at once. A configured Preemption (the SLURM template's) is left as it is."""
    callbacks = trainer.callbacks
    keeps_last = any(isinstance(c, Checkpoint) and c.save_last for c in callbacks)
    if not keeps_last or any(isinstance(c, Preemption) for c in callbacks):
        return
    trainer.callbacks.append(Preemption(signals=["SIGINT"], requeue=False))


def run_lightning(args: Optional[List[str]] = None) -> LightningCLI:
    """LightningCLI taking any LightningModule / DataModule by class path (the recipes name them)."""
    # DINO's device-side augmentation overrides on_after_batch_transfer on purpose; Lightning warns
    # whenever a module does so while a DataModule is used. Silenced for the command, not on import.
    warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer` in `LightningModule`.*")
    # The feature writer does not use the batch indices Lightning tracks for prediction writers (shards
    # stream: there are none to infer); it keys rows by the samples' own keys.
    warnings.filterwarnings("ignore", message=r".*Couldn't infer the batch indices fetched from your dataloader.*")
    return SSLViTCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the methods own their optimisers: no --optimizer / --lr_scheduler
        args=args,
    )


def main(args: Optional[List[str]] = None) -> None:
    run_lightning(None if args is None else list(args))  # None: LightningCLI reads sys.argv itself (no warning)


if __name__ == "__main__":
    main()
