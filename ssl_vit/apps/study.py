"""`ssl-vit study`: a grid over backbone options, each cell a normal recipe run, in one table.

    ssl-vit study --output runs/study --epochs 5 \\
        --grid patch_size=4,8 depth=2,4 embed_dim=64,128 pos_embed=learn,sincos,none global_pool=token,avg
    ssl-vit study --output runs/study --grid patch_size=4,8 --grid pos_embed=learn,none   # union of two grids

Each ``--grid`` is a product of ``KEY=V1,V2,...`` lists; several ``--grid`` give the union of their
products (cells in several are run once). Keys are ``create_backbone`` keyword arguments
(``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``pos_embed``, ``global_pool``, ``stem``...);
values are passed as they are (numbers as numbers, everything else as strings), so any option
``create_backbone`` knows is a grid axis. Options a cell does not vary keep the recipe's values.

Every cell is ``ssl-vit fit --config RECIPE`` with the cell's options as command-line overrides,
run in this process, into ``OUTPUT/cells/<name>/`` (with the ``config.yaml`` LightningCLI saves: the
run can be repeated on its own). The default recipe, ``study/scratch_digits``, trains supervised
from random weights on scikit-learn's digits (exported to ``OUTPUT/data`` on first use); any
recipe of the finetune method (``weights: null``) works, e.g. on CIFAR-10 shards with ``--recipe``,
``--train``, ``--val``. The figure is the recipe's ``val/top1`` after the last epoch.

A finished cell writes ``result.json``; a study run again skips those cells (it is resumable, and a
grid can grow). A failing cell is reported and the others still run; the exit status is then 1.
Written: ``study.json`` (every cell, the machine's load), ``study.md`` (the table, and the change
in accuracy each option value makes between cells that differ in it alone), ``accuracy_vs_params.png`` and ``accuracy_vs_flops.png``.
Parameters and FLOPs are those of ``ssl-vit describe`` (the backbone at the recipe's resolution,
counted forward FLOPs per image, 2 per multiply-add).
"""
import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml

from ssl_vit.apps.demo import quiet_run
from ssl_vit.apps.describe import describe, parse_value
from ssl_vit.apps.runs import StageError, run_cli
from ssl_vit.data import export_digits
from ssl_vit.models.backbone import resolve_arch
from ssl_vit.recipes import find_recipe
from ssl_vit.viz.plot import scatter_png

DEFAULT_RECIPE = "study/scratch_digits"
MODEL_OPTIONS = ("global_pool",)  # Finetune arguments of their own; every other option is a backbone kwarg
RESULT = "result.json"


def parse_grid(specs: Sequence[Sequence[str]]) -> List[Dict[str, Any]]:
    """The cells of the union of the products ``specs`` (each a list of ``KEY=V1,V2`` strings), in
    order, each once.

    Raises:
        ValueError: an item without ``=`` or without values, or a key twice in one product.
    """
    cells: List[Dict[str, Any]] = []
    for spec in specs:
        axes: Dict[str, List[Any]] = {}
        for item in spec:
            key, sep, values = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key or not values.strip(","):
                raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. patch_size=4,8)")
            if key in axes:
                raise ValueError(f"--grid: {key} is given twice in one grid")
            axes[key] = [parse_value(v) for v in values.split(",") if v]
        for combination in itertools.product(*axes.values()):
            cell = dict(zip(axes, combination))
            if cell not in cells:
                cells.append(cell)
    if not cells:
        raise ValueError("--grid: no cells (give at least one KEY=V1,V2,...)")
    return cells


def cell_name(options: Dict[str, Any]) -> str:
    """``patch_size-4_depth-2_pos_embed-none``: the cell's folder name."""
    return "_".join(f"{k}-{v}" for k, v in options.items()) or "base"


def recipe_backbone(recipe: Path) -> Dict[str, Any]:
    """``{"arch", "global_pool", "backbone_kwargs"}`` of a finetune-method recipe.

    Raises:
        ValueError: the recipe has no ``model.init_args.arch`` (not a finetune recipe).
    """
    config = yaml.safe_load(recipe.read_text()) or {}
    init = (config.get("model") or {}).get("init_args") or {}
    if not init.get("arch") or init.get("weights"):
        raise ValueError(f"--recipe {recipe}: a study recipe trains from scratch: it needs model.init_args.arch "
                         "and weights: null (see recipes/study/scratch_digits.yaml)")
    return {"arch": init["arch"], "global_pool": init.get("global_pool", "avg"),
            "backbone_kwargs": dict(init.get("backbone_kwargs") or {})}


def budget(recipe: Path, epochs: int, seed: int, max_minutes: Optional[float]) -> Dict[str, Any]:
    """What a cell's result depends on besides its options: a resumed study reuses a result only
    when this matches (a study rerun with more epochs retrains every cell)."""
    return {"recipe": str(recipe), "epochs": epochs, "seed": seed, "max_minutes": max_minutes}


def run_cell(options: Dict[str, Any], base: Dict[str, Any], recipe: Path, train: str, val: str, folder: Path,
             epochs: int, seed: int, max_minutes: Optional[float]) -> Dict[str, Any]:
    """Train one cell and return its result (also written to ``folder/result.json``)."""
    kwargs = {**base["backbone_kwargs"], **{k: v for k, v in options.items() if k not in MODEL_OPTIONS}}
    model_options = {k: options.get(k, base[k]) for k in MODEL_OPTIONS}
    img_size = int(resolve_arch(base["arch"], **kwargs)[1].get("img_size", 224))
    cost = describe(base["arch"], [img_size], **model_options, **kwargs)[0]  # fails fast on a bad option
    args = ["fit", "--config", str(recipe), "--data.train", train, "--data.val", val,
            "--trainer.default_root_dir", str(folder), "--trainer.max_epochs", str(epochs),
            "--trainer.check_val_every_n_epoch", str(epochs), "--seed_everything", str(seed),
            "--model.backbone_kwargs", json.dumps(kwargs)]
    for key, value in model_options.items():
        args += [f"--model.{key}", str(value)]
    if max_minutes is not None:
        seconds = max(1, round(max_minutes * 60))
        args += ["--trainer.max_time", f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"]
    start = time.perf_counter()
    cli = run_cli(args, stage=f"study cell {folder.name}")
    wall = time.perf_counter() - start
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    if "val/top1" not in metrics:
        raise StageError(f"study cell {folder.name}: the run logged no val/top1 (does the recipe have val data?)")
    result = {"name": folder.name, "options": options, "budget": budget(recipe, epochs, seed, max_minutes),
              "arch": base["arch"], "backbone_kwargs": kwargs,
              **model_options, "img_size": img_size, "params": cost.params, "flops": cost.flops,
              "attention_share": cost.attention_share, "epochs": int(cli.trainer.current_epoch),
              "steps": int(cli.trainer.global_step), "wall_s": wall, "val_top1": metrics["val/top1"],
              "val_loss": metrics.get("val/loss"), "config": str(folder / "config.yaml")}
    tmp = folder / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(folder / RESULT)  # a half-written result would make a resumed study skip the cell
    return result


def paired_effects(results: Sequence[Dict[str, Any]], keys: Sequence[str]) -> List[Dict[str, Any]]:
    """For each option and each of its values after the first: the top-1 difference to the first
    value over the pairs of cells that differ in that option only.

    A union of grids is not balanced (the cells with ``depth=4`` may all use one pooling), so the
    mean top-1 of all cells with a value mixes in the other options; matched pairs do not.
    """
    by_options = {json.dumps(r["options"], sort_keys=True): r for r in results}
    effects = []
    for key in keys:
        values = list(dict.fromkeys(r["options"][key] for r in results if key in r["options"]))
        for value in values[1:]:
            diffs = []
            for r in results:
                if r["options"].get(key) == value:
                    base = by_options.get(json.dumps({**r["options"], key: values[0]}, sort_keys=True))
                    if base is not None:
                        diffs.append(r["val_top1"] - base["val_top1"])
            if diffs:
                effects.append({"option": key, "value": value, "against": values[0], "pairs": len(diffs),
                                "mean": sum(diffs) / len(diffs), "min": min(diffs), "max": max(diffs),
                                "wins": sum(d > 0 for d in diffs)})
    return effects


def markdown_table(results: Sequence[Dict[str, Any]], keys: Sequence[str]) -> str:
    """One row per cell (its options, parameters, MFLOPs, attention share, wall time, top-1), then
    the paired effect of each option value (:func:`paired_effects`), in top-1 points."""
    head = [*keys, "params (k)", "MFLOPs", "attn %", "wall s", "top-1 %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [str(r["options"].get(k, "")) for k in keys]
        row += [f"{r['params'] / 1e3:.0f}", f"{r['flops'] / 1e6:.1f}", f"{100 * r['attention_share']:.0f}",
                f"{r['wall_s']:.0f}", f"{100 * r['val_top1']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| option | value vs | pairs | mean change (points) | range | better in |", "|---|---|---|---|---|---|"]
    for e in paired_effects(results, keys):
        lines.append(f"| {e['option']} | {e['value']} vs {e['against']} | {e['pairs']} | {100 * e['mean']:+.1f} | "
                     f"{100 * e['min']:+.1f} to {100 * e['max']:+.1f} | {e['wins']}/{e['pairs']} |")
    return "\n".join(lines) + "\n"


def plots(results: Sequence[Dict[str, Any]], output: Path, colour_by: Optional[str]) -> List[Path]:
    """Top-1 against parameters and against FLOPs (log x), one colour per value of ``colour_by``."""
    series: Dict[str, List[Dict[str, Any]]] = {}
    for r in results:
        label = f"{colour_by}={r['options'].get(colour_by)}" if colour_by else ""
        series.setdefault(label, []).append(r)
    written = []
    for field, label, scale, name in (("params", "parameters (k)", 1e3, "params"),
                                      ("flops", "forward MFLOPs per image", 1e6, "flops")):
        points = {k: [(r[field] / scale, 100 * r["val_top1"]) for r in rs] for k, rs in series.items()}
        written.append(scatter_png(output / f"accuracy_vs_{name}.png", points, label, "top-1 % (held out)",
                                   title=f"top-1 against {label}, {len(results)} cells", log_x=True))
    return written


def run_study(
    output: Path, cells: Sequence[Dict[str, Any]], epochs: int, recipe: str = DEFAULT_RECIPE,
    train: Optional[str] = None, val: Optional[str] = None, seed: int = 0, threads: Optional[int] = None,
    max_minutes: Optional[float] = None, colour_by: Optional[str] = None,
) -> Dict[str, Any]:
    """Run (or resume) the study into ``output`` and return ``study.json``'s content.

    Raises:
        ValueError: ``epochs`` < 1, only one of ``train`` / ``val``, or a recipe that is not a
            from-scratch finetune recipe.
    """
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if (train is None) != (val is None):
        raise ValueError("--train and --val go together (the default is the digits, exported under --output)")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    recipe_path = find_recipe(recipe)
    base = recipe_backbone(recipe_path)
    if train is None:
        data = output / "data"
        if not (data / "train").is_dir() or not (data / "test").is_dir():
            export_digits(data, size=32, seed=0, overwrite=True)  # one split for every --seed: seeds compare
        train, val = str(data / "train"), str(data / "test")
    threads = max(1, (os.cpu_count() or 2) - 1) if threads is None else threads
    keys = list(dict.fromkeys(k for cell in cells for k in cell))
    results, failed = [], []
    load_start, start = os.getloadavg(), time.perf_counter()
    with quiet_run(threads):
        for i, options in enumerate(cells):
            full = {k: options.get(k, base["backbone_kwargs"].get(k, base.get(k))) for k in keys}
            folder = output / "cells" / cell_name(full)
            done = json.loads((folder / RESULT).read_text()) if (folder / RESULT).is_file() else None
            if done is not None and done.get("budget") == budget(recipe_path, epochs, seed, max_minutes):
                results.append(done)
                print(f"[{i + 1}/{len(cells)}] {folder.name}: done before, skipped", flush=True)
                continue
            try:
                result = run_cell(full, base, recipe_path, train, val, folder, epochs, seed, max_minutes)
            except (StageError, ValueError) as err:
                failed.append({"name": folder.name, "options": full, "error": str(err)})
                print(f"[{i + 1}/{len(cells)}] {folder.name}: FAILED: {err}", flush=True)
                continue
            results.append(result)
            print(f"[{i + 1}/{len(cells)}] {folder.name}: top-1 {100 * result['val_top1']:.1f}% "
                  f"({result['wall_s']:.0f} s)", flush=True)
    summary = {"recipe": str(recipe_path), "train": train, "val": val, "epochs": epochs, "seed": seed,
               "threads": threads, "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "wall_s": time.perf_counter() - start,
               "cells_wall_s": sum(r["wall_s"] for r in results), "load_average_start": load_start,
               "load_average_end": os.getloadavg(), "keys": keys, "cells": results, "failed": failed}
    (output / "study.json").write_text(json.dumps(summary, indent=1))
    if results:
        (output / "study.md").write_text(markdown_table(results, keys))
        plots(results, output, colour_by or (keys[0] if keys else None))
    return summary


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssl-vit study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="study folder (cells/, study.json, study.md, *.png)")
    parser.add_argument("--grid", nargs="+", action="append", required=True, metavar="KEY=V1,V2",
                        help="one product of option lists; repeat --grid for a union of products")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per cell (the schedule's length too)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="also stop a cell after this many minutes (its schedule stays sized for --epochs)")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="a from-scratch finetune recipe")
    parser.add_argument("--train", default=None, help="training data for the recipe (default: the digits)")
    parser.add_argument("--val", default=None, help="held-out data the top-1 is measured on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: CPU cores - 1)")
    parser.add_argument("--colour-by", default=None, help="option that colours the plots (default: the first key)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cells = parse_grid(args.grid)
    summary = run_study(Path(args.output), cells, args.epochs, args.recipe, args.train, args.val, args.seed,
                        args.threads, args.max_minutes, args.colour_by)
    print(f"{len(summary['cells'])} cells in {summary['wall_s']:.0f} s: {Path(args.output) / 'study.md'}")
    if summary["failed"]:
        print(f"{len(summary['failed'])} cells failed (listed in {Path(args.output) / 'study.json'})")
        return 1
    return 0
