"""The benchmark's outputs: the result rows, ``results.md``, the environment it ran in, and the
attention gallery as one picture.

Rows (one per representation; figures are top-1 fractions in [0, 1], ``None`` where a row has no
such figure):

* ``DINO`` / ``MAE``: the pretrained backbone under k-NN, the linear probe and finetuning;
* ``supervised from scratch``: the same architecture trained with the finetune recipe from random
  weights (finetune column only);
* ``random weights (DINO protocol)`` / ``(MAE protocol)``: the pretrained architecture, randomly
  initialised, under the same k-NN and linear-probe recipes (no training: 0 epochs);
* ``raw pixels``: k-NN on the normalised pixels (no architecture, no training).
"""
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import pytorch_lightning
import timm
import torch
from PIL import Image, ImageDraw

from ssl_vit.apps.runs import KNN_K, KNN_T, PACKAGE_PARENT

FIGURES = ("knn_top1", "linear_top1", "finetune_top1")
# The targets: (label, row, figure, threshold).
TARGETS = (
    ("DINO k-NN top-1 >= 88%", "DINO", "knn_top1", 0.88),
    ("DINO linear top-1 >= 90%", "DINO", "linear_top1", 0.90),
    ("MAE finetune top-1 >= 93%", "MAE", "finetune_top1", 0.93),
)
WIDE_MARGIN = 0.10  # "beats the random-init and raw-pixel rows by a wide margin", read as >= 10 points


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", *args], cwd=PACKAGE_PARENT, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def device_name(accelerator: str) -> str:
    """The device the stages run on: the GPU's name, or the CPU's."""
    if accelerator != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, 1 device)"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def environment(accelerator: str) -> Dict[str, Any]:
    """Commit, device and library versions, for the record."""
    status = _git("status", "--porcelain")
    return {
        "git_commit": _git("rev-parse", "HEAD") or "unknown (not a git checkout)",
        "git_dirty": bool(status) if status is not None else None,
        "device": device_name(accelerator),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
    }


def architecture(arch: Optional[str], kwargs: Optional[Mapping[str, Any]]) -> Optional[str]:
    """``vit_small_patch4_32`` plus any size the name does not imply (``embed_dim=32, depth=1``)."""
    if arch is None:
        return None
    sizes = [f"{k}={kwargs[k]}" for k in ("embed_dim", "depth", "num_heads") if kwargs and k in kwargs]
    return arch + (f" ({', '.join(sizes)})" if sizes else "")


def result_rows(stages: Mapping[str, Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The table's rows from the stage results (missing stages give ``None`` figures)."""
    def value(name: str) -> Optional[float]:
        return stages.get(name, {}).get("value")

    rows = []
    for method in ("dino", "mae"):
        pre = stages.get(f"{method}_pretrain", {})
        rows.append({
            "method": method.upper(), "architecture": pre.get("architecture"), "epochs": pre.get("epochs"),
            "gpu_minutes": pre.get("minutes"), "knn_top1": value(f"{method}_knn"),
            "linear_top1": value(f"{method}_linear"), "finetune_top1": value(f"{method}_finetune"),
        })
    scratch = stages.get("scratch", {})
    rows.append({
        "method": "supervised from scratch", "architecture": scratch.get("architecture"), "epochs": scratch.get("epochs"),
        "gpu_minutes": scratch.get("minutes"), "knn_top1": None, "linear_top1": None, "finetune_top1": value("scratch"),
    })
    for method in ("dino", "mae"):
        rows.append({
            "method": f"random weights ({method.upper()} protocol)",
            "architecture": stages.get(f"{method}_pretrain", {}).get("architecture"), "epochs": 0, "gpu_minutes": 0.0,
            "knn_top1": value(f"random_{method}_knn"), "linear_top1": value(f"random_{method}_linear"), "finetune_top1": None,
        })
    rows.append({"method": "raw pixels", "architecture": None, "epochs": 0, "gpu_minutes": 0.0,
                 "knn_top1": value("pixels_knn"), "linear_top1": None, "finetune_top1": None})
    return rows


def check_targets(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Each target of the issue with the figure reached and whether it is met (``None``: not measured)."""
    by_method = {row["method"]: row for row in rows}
    checks = []
    for label, method, figure, threshold in TARGETS:
        got = by_method[method][figure]
        checks.append({"target": label, "value": got, "met": None if got is None else got >= threshold})
    scratch = by_method["supervised from scratch"]["finetune_top1"]
    for method in ("DINO", "MAE"):
        got = by_method[method]["finetune_top1"]
        met = None if got is None or scratch is None else got > scratch
        checks.append({"target": f"{method} finetune beats supervised from scratch", "value": got, "met": met})
        refs = [by_method[f"random weights ({method} protocol)"]["knn_top1"], by_method["raw pixels"]["knn_top1"]]
        knn = by_method[method]["knn_top1"]
        met = None if knn is None or None in refs else knn >= max(refs) + WIDE_MARGIN
        checks.append({"target": f"{method} k-NN >= random weights and raw pixels + {WIDE_MARGIN:.0%}", "value": knn, "met": met})
    return checks


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def _num(value: Optional[float], digits: int = 1) -> str:
    return "—" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: the table, how it was made, the targets and the stages."""
    env, data, rows = results["environment"], results["data"], results["rows"]
    lines = ["# CIFAR-10 representation quality", ""]
    if results["reduced"]:
        lines += ["> **Pipeline check only.** A reduced run (" + results["reduced"] + "): these figures show that",
                  "> every stage ran and produced a valid number; they say nothing about representation quality.", ""]
    if results.get("missing") and not results.get("failed"):
        lines += [f"> **Incomplete**: not run yet: {', '.join(results['missing'])} (continue with `--resume`).", ""]
    if results.get("failed"):
        lines += [f"> **Incomplete: stage `{results['failed']['stage']}` failed**: {results['failed']['error'].splitlines()[0]}", ""]
    lines += ["| method | architecture | epochs | GPU-minutes | k-NN top-1 | linear top-1 | finetune top-1 |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['architecture'] or '—'} | {_num(row['epochs'])} | {_num(row['gpu_minutes'])} | "
                     f"{_pct(row['knn_top1'])} | {_pct(row['linear_top1'])} | {_pct(row['finetune_top1'])} |")
    dirty = " (with uncommitted changes)" if env.get("git_dirty") else ""
    lines += [
        "",
        f"- command: `{results['command']}`",
        f"- commit: `{env['git_commit']}`{dirty}",
        f"- device: {env['device']}; torch {env['torch']}, timm {env['timm']}, Lightning {env['pytorch_lightning']}",
        f"- data: {data['counts']['train']:,} train / {data['counts']['test']:,} test images, {len(data['classes'])} classes "
        f"(`{data['source']}`); every figure is measured on the test images",
        f"- k-NN: k = {KNN_K}, T = {KNN_T}, cosine similarity, bank = the train images; linear probe and finetune: "
        "the last epoch's top-1 (no model selection on the test split)",
        f"- GPU-minutes: wall minutes of the training stage on the device above (pretraining: the timed run "
        f"included); pretraining budget {results['budget_minutes']:g} min per method",
    ]
    for method in ("dino", "mae"):
        plan = results["stages"].get(f"{method}_pretrain", {}).get("plan")
        if plan:
            lines.append(f"- {method.upper()} epochs: {plan['how']}")
    if results.get("gallery"):
        lines += ["", f"DINO attention (last block, CLS token, 16 test images): `{results['gallery']}`"]
    if not results["reduced"]:
        lines += ["", "## Targets (issue 9)", "", "| target | reached | met |", "|---|---:|---|"]
        for check in results["targets"]:
            met = {True: "yes", False: "**no**", None: "not measured"}[check["met"]]
            lines.append(f"| {check['target']} | {_pct(check['value'])} | {met} |")
    lines += ["", "## Stages", "", "| stage | minutes | epochs | result | log |", "|---|---:|---:|---|---|"]
    for name, stage in results["stages"].items():
        value = stage.get("value")
        shown = f"{stage.get('metric', '')} {_pct(value)}".strip() if value is not None else stage.get("summary", "")
        lines.append(f"| {name} | {_num(stage.get('minutes'), 2)} | {_num(stage.get('epochs'))} | {shown} | "
                     f"{'`' + stage['log'] + '`' if stage.get('log') else '—'} |")
    return "\n".join(lines) + "\n"


def attention_sheet(folder: Path, names: Sequence[str], scale: int = 3) -> Image.Image:
    """One picture of an attention gallery written by ``ssl_vit.viz.gallery.export_attention``:
    a row per image (``names``, in order): the image, the head-mean heat map, the image with the
    patches holding most of the mean attention, then each head's heat map; ``scale`` x nearest."""
    folder = Path(folder)
    if not names:
        raise ValueError(f"no images to show from {folder}")
    heads = sorted(p.stem[len("heat_"):] for p in (folder / names[0]).glob("heat_head_*.png"))
    columns = [("image", "image.png"), ("mean", "heat_mean.png"), ("mask", "overlay_mean.png")]
    columns += [(head.replace("head_", "head "), f"heat_{head}.png") for head in heads]
    tiles = []
    for name in names:
        row = []
        for _, file in columns:
            path = folder / name / file
            if not path.is_file():
                raise FileNotFoundError(f"attention gallery file missing: {path}")
            with Image.open(path) as image:
                row.append(image.convert("RGB"))
        tiles.append(row)
    height, width = (side * scale for side in (tiles[0][0].height, tiles[0][0].width))
    pad, header = 2, 14
    sheet = Image.new("RGB", (len(columns) * (width + pad) + pad, header + len(names) * (height + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (label, _) in enumerate(columns):
        draw.text((pad + c * (width + pad) + 2, 1), label, fill="black")
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            sheet.paste(tile.resize((width, height), Image.NEAREST), (pad + c * (width + pad), header + pad + r * (height + pad)))
    return sheet
