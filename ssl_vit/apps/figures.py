"""Re-measure the CPU figures the docs quote (`make figures`): sharding speed, the step time of the
CIFAR-10 recipes on this machine, and (optionally) the demo.

    python tools/measure_figures.py --data ../shared/datasets/cifar10-jpg.tar.gz --output runs/figures

1. unpacks the CIFAR-10 JPEGs (a ``.tar.gz`` holding ``cifar10/{train,test}/<class>/``, or that folder)
   and times ``ssl-vit make-shards`` of the train split;
2. runs each recipe (default: the CIFAR-10 DINO and MAE recipes) for ``--steps`` steps, overriding
   only the data paths and the run folder (precision, workers and batch are the recipe's: on a CPU
   the run picks fp32 by itself), with :class:`ssl_vit.training.progress.StepTimer` added to record
   every step's wall time;
3. with ``--demo``, runs ``ssl-vit demo`` and keeps its ``summary.json``.

Writes ``figures.json`` (machine, date, commit, load, every figure) and prints a Markdown summary.
Each command runs in a child process whose log is kept next to its result.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ssl_vit.apps.runs import PACKAGE_PARENT, run_cli_subprocess

RECIPES = ("dino/vit_small_patch4_cifar10", "mae/vit_small_patch4_cifar10")


def machine() -> Dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    if os.path.exists("/proc/cpuinfo"):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PACKAGE_PARENT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(), "cpu": model,
            "platform": platform.platform(), "torch": torch.__version__, "commit": commit,
            "load_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def cifar_folder(data: Path, work: Path) -> Path:
    """The folder holding ``train/`` and ``test/`` class folders: ``data`` itself, or unpacked from it."""
    if data.is_dir():
        return data
    if not data.is_file():
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    target = work / "cifar10"
    if not (target / "train").is_dir():
        with tarfile.open(data) as archive:  # the "data" filter refuses links and paths out of `work`
            archive.extractall(work, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    if not (target / "train").is_dir():
        raise ValueError(f"--data {data} holds no cifar10/train folder")
    return target


def measure(data: Optional[Path], output: Path, recipes: List[str], steps: int, demo: bool) -> Dict[str, Any]:
    output = output.resolve()  # the commands run from the package's folder
    data = None if data is None else data.resolve()
    output.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = {"machine": machine(), "recipes": {}}
    if data is not None:
        folder = cifar_folder(data, output)
        shards = output / "shards"
        common = ["--output", str(shards), "--shard-size", "5000", "--overwrite", "--no-progress"]
        seconds = run_cli_subprocess(["make-shards", "--input", str(folder / "train"), "--split", "train", *common],
                                     "make-shards train", output / "make_shards.log")
        info = json.loads((shards / "train.json").read_text())
        result["make_shards"] = {"images": info["num_samples"], "seconds": round(seconds, 1),
                                 "images_per_s": round(info["num_samples"] / seconds)}
        run_cli_subprocess(["make-shards", "--input", str(folder / "test"), "--split", "test", *common],
                           "make-shards test", output / "make_shards_test.log")
        train = str(shards / f"train-{{000000..{len(info['shards']) - 1:06d}}}.tar")
        test_info = json.loads((shards / "test.json").read_text())
        val = str(shards / f"test-{{000000..{len(test_info['shards']) - 1:06d}}}.tar")
        for recipe in recipes:
            run = output / recipe.replace("/", "_")
            timer = {"class_path": "ssl_vit.training.progress.StepTimer", "init_args": {"path": str(run / "steps.json")}}
            args = ["fit", "--config", recipe, "--data.train", train, "--data.val", val, "--data.eval_train", train,
                    "--trainer.default_root_dir", str(run), "--trainer.max_steps", str(steps),
                    f"--trainer.callbacks+={json.dumps(timer)}"]
            wall = run_cli_subprocess(args, f"{recipe} smoke", run / "fit.log")
            times = json.loads((run / "steps.json").read_text())
            result["recipes"][recipe] = {"steps": len(times["step_s"]), "median_step_s": round(times["median_s"], 2),
                                         "first_step_s": round(times["step_s"][0], 2), "wall_s": round(wall, 1)}
    if demo:
        seconds = run_cli_subprocess(["demo", "--output", str(output / "demo")], "demo", output / "demo.log")
        summary = json.loads((output / "demo" / "summary.json").read_text())
        result["demo"] = {"wall_s": round(seconds, 1), "timings": summary["timings"], "results": summary["results"]}
    result["machine"]["load_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    (output / "figures.json").write_text(json.dumps(result, indent=2))
    return result


def markdown(result: Dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"Measured {m['date']} on {m['cpus']} CPUs ({m['cpu'] or m['platform']}), torch {m['torch']}, "
             f"commit {m['commit']}, load {m['load_before'][0]:.1f} before / {m['load_after'][0]:.1f} after:"]
    if "make_shards" in result:
        s = result["make_shards"]
        lines.append(f"- make-shards: {s['images']} images in {s['seconds']} s ({s['images_per_s']} img/s)")
    for recipe, r in result["recipes"].items():
        lines.append(f"- {recipe}: {r['steps']} steps, median step {r['median_step_s']} s (first {r['first_step_s']} s), "
                     f"{r['wall_s']} s wall")
    if "demo" in result:
        lines.append(f"- ssl-vit demo: {result['demo']['timings']['total_s']} s ({result['demo']['wall_s']} s wall)")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="measure_figures", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="cifar10-jpg.tar.gz or the cifar10 folder (omit: no CIFAR figures)")
    p.add_argument("--output", type=Path, default=Path("runs/figures"))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), help="recipes to time (names or paths)")
    p.add_argument("--steps", type=int, default=20, help="training steps per recipe (default 20)")
    p.add_argument("--demo", action="store_true", help="also run ssl-vit demo")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps must be >= 2 (the first step is timed apart), got {args.steps}")
    if args.data is None and not args.demo:
        p.error("nothing to measure: give --data and/or --demo")
    print(markdown(measure(args.data, args.output, args.recipes, args.steps, args.demo)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
