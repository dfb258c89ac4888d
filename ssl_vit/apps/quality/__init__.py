"""The CIFAR-10 representation-quality benchmark (``ssl-vit quality``, ``tools/bench_quality.py``).

    ssl-vit quality --data ../shared/datasets/cifar10-jpg.tar.gz --output runs/quality

pretrains DINO and MAE within a time budget each, evaluates both (k-NN, linear probe, finetune)
against a supervised baseline, random weights and raw pixels, and writes ``results.json``,
``results.md`` and ``attention_gallery.png``. See :mod:`ssl_vit.apps.quality.bench` for the stages.
"""
import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from ssl_vit.apps.quality.bench import RECIPES, STAGES, QualityOptions, run_quality
from ssl_vit.apps.runs import StageError

__all__ = ["QualityOptions", "run_quality", "main", "command", "build_parser"]


def _recipe_arg(text: str) -> List[str]:
    key, sep, path = text.partition("=")
    if not sep or key not in RECIPES or not path:
        raise argparse.ArgumentTypeError(f"--recipe takes STAGE=PATH with STAGE one of {', '.join(RECIPES)}, got {text!r}")
    return [key, path]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssl-vit quality",
        description="CIFAR-10 representation quality: pretrain DINO and MAE within a time budget each, evaluate them "
                    "(k-NN, linear probe, finetune) against a supervised baseline, random weights and raw pixels; "
                    "write OUTPUT/results.json, OUTPUT/results.md and OUTPUT/attention_gallery.png.",
        epilog="Reduced CPU check (what tests/apps/test_quality.py runs): --limit-train 300 --limit-test 100 --tiny "
               "--epochs 1 --probe-epochs 1 --finetune-epochs 1 --device cpu --workers 0 --batch-size 50 --in-process",
    )
    p.add_argument("--data", type=Path, required=True,
                   help="archive with .../train/<class>/<image> and .../test/<class>/<image>, or such a folder")
    p.add_argument("--output", type=Path, default=Path("runs/quality"), help="run folder (default runs/quality)")
    p.add_argument("--budget-minutes", type=float, default=30.0,
                   help="pretraining budget per method, timed run included (default 30)")
    p.add_argument("--epochs", type=int, help="pretraining epochs of both methods (default: what a timed run says fits the budget)")
    p.add_argument("--probe-epochs", type=int, help="linear-probe epochs (default: the recipes')")
    p.add_argument("--finetune-epochs", type=int, help="finetune and supervised-baseline epochs (default: the recipes')")
    p.add_argument("--limit-train", type=int, help="use this many train images, the same number from each class")
    p.add_argument("--limit-test", type=int, help="use this many test images, the same number from each class")
    p.add_argument("--tiny", action="store_true", help="tiny models (embed 32, depth 1, small heads): a pipeline check")
    p.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto", help="accelerator of every stage (cpu: fp32)")
    p.add_argument("--batch-size", type=int, help="batch size of every stage (default: the recipes')")
    p.add_argument("--workers", type=int, help="data loader workers of every stage (default: the recipes')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-process", action="store_true", help="run the evaluation stages in this process (pretraining "
                   "always runs in a child process)")
    p.add_argument("--resume", action="store_true", help="continue a run in --output: skip finished stages, resume an "
                   "interrupted pretraining from its last checkpoint")
    p.add_argument("--stop-after", choices=STAGES, metavar="STAGE", help="stop once this stage is done (to split a "
                   "run into commands; continue with --resume); stages in order: " + ", ".join(STAGES))
    p.add_argument("--recipe", type=_recipe_arg, action="append", default=[], metavar="STAGE=PATH",
                   help=f"use another recipe for a stage ({', '.join(RECIPES)})")
    return p


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Parse the command line, run the benchmark, print where the results are."""
    args = build_parser().parse_args(argv)  # values are checked by Bench, before any work
    os.environ.setdefault("WANDB_MODE", "offline")  # the stages log to CSV: no wandb network probe
    command = shlex.join(["python", "tools/bench_quality.py", *(sys.argv[1:] if argv is None else argv)])
    opts = QualityOptions(
        data=args.data, output=args.output, budget_minutes=args.budget_minutes, epochs=args.epochs,
        probe_epochs=args.probe_epochs, finetune_epochs=args.finetune_epochs, limit_train=args.limit_train,
        limit_test=args.limit_test, tiny=args.tiny, device=args.device, batch_size=args.batch_size, workers=args.workers,
        seed=args.seed, in_process=args.in_process, resume=args.resume, stop_after=args.stop_after,
        recipes=dict(args.recipe), command=command,
    )
    results = run_quality(opts)
    print((args.output / "results.md").read_text())
    print(f"results: {args.output / 'results.json'}, {args.output / 'results.md'}, {args.output / 'attention_gallery.png'}")
    return results


def command(argv: Optional[List[str]] = None) -> int:
    """``main`` as a command: a failed stage is one message naming it (and its log), exit status 1."""
    try:
        main(argv)
    except StageError as err:
        print(f"ssl-vit quality: error: {err}", file=sys.stderr)
        return 1
    return 0
