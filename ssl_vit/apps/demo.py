"""`ssl-vit demo`: a complete small run on data that ships with scikit-learn, on CPU, in minutes.

1. writes scikit-learn's 1,797 handwritten digits as 32x32 images (train / held-out test split);
2. turns the train and test folders into webdataset shards;
3. pretrains a small MAE and a small DINO through `ssl-vit fit` with the recipes in recipes/demo/;
4. reports the k-NN accuracy (k=20, cosine, T=0.07) on the held-out split of the frozen features of
   each pretrained backbone, of the same architecture with random weights, and of raw pixels;
5. writes MAE reconstruction grids and DINO attention maps.

Everything goes under ``--output``; ``summary.json`` holds the accuracies, timings and paths.
"""
import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ssl_vit.apps.runs import KNN_K, KNN_T, backbone_features, knn_accuracy, run_cli
from ssl_vit.apps.runs import shard_pattern as _shard_pattern

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "demo"


def _pretrain(recipe: Path, train: str, run_dir: Path, epochs: Optional[int], seed: int) -> Path:
    """`ssl-vit fit` with a demo recipe; returns the final checkpoint."""
    if not recipe.is_file():
        raise FileNotFoundError(f"demo recipe {recipe} is missing: run the demo from a checkout of ssl_vit")
    args = ["fit", "--config", str(recipe), "--data.train", train, "--trainer.default_root_dir", str(run_dir),
            "--seed_everything", str(seed)]
    if epochs is not None:
        args += ["--trainer.max_epochs", str(epochs)]
    cli = run_cli(args, stage=f"demo {recipe.stem}")
    ckpt = run_dir / "last.ckpt"
    cli.trainer.save_checkpoint(ckpt, weights_only=False)  # full state: a run can resume from it
    return ckpt


def run_demo(
    output: Path, seed: int = 0, mae_epochs: Optional[int] = None, dino_epochs: Optional[int] = None,
    methods: List[str] = ("mae", "dino"),
) -> Dict[str, Any]:
    """Run the demo into ``output`` and return the summary (also written to ``summary.json``)."""
    from ssl_vit.checkpoints.load import load_backbone
    from ssl_vit.data import export_digits, write_shards
    from ssl_vit.models.backbone import create_backbone

    unknown = set(methods) - {"mae", "dino"}
    if unknown or not methods:
        raise ValueError(f"--methods takes mae and/or dino, got {sorted(methods)}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, float] = {}
    paths: Dict[str, str] = {}
    t0 = time.perf_counter()

    data = output / "data"
    digits = export_digits(data, size=32, seed=seed, overwrite=True)
    train_dir, test_dir = data / "train", data / "test"
    shards = output / "shards"
    info = write_shards(train_dir, shards, "train", shard_size=512, seed=seed, overwrite=True, progress=False)
    write_shards(test_dir, shards, "test", shard_size=512, seed=seed, overwrite=True, progress=False)
    train_pattern = _shard_pattern(info, shards)
    timings["data_s"] = time.perf_counter() - t0
    paths.update(images=str(data), shards=str(shards))

    rows: List[Dict[str, Any]] = []
    t = time.perf_counter()
    pixels = knn_accuracy(lambda images: images.flatten(1), train_dir, test_dir, 32)
    rows.append({"features": "raw pixels", "knn_top1": pixels})
    timings["pixels_knn_s"] = time.perf_counter() - t

    # MAE's representation is the mean patch token; DINO's the CLS token (each method's protocol).
    feature_of = {"mae": "avg", "dino": "cls"}
    epochs = {"mae": mae_epochs, "dino": dino_epochs}
    for method in methods:
        t = time.perf_counter()
        run_dir = output / method
        ckpt = _pretrain(RECIPES / f"{method}_digits.yaml", train_pattern, run_dir, epochs[method], seed)
        timings[f"{method}_pretrain_s"] = time.perf_counter() - t
        paths[f"{method}_checkpoint"] = str(ckpt)

        t = time.perf_counter()
        meta = torch.load(ckpt, map_location="cpu", weights_only=True)["ssl_vit"]
        trained = load_backbone(ckpt)
        torch.manual_seed(seed)
        random = create_backbone(meta["arch"], **meta["backbone_kwargs"])
        feature = feature_of[method]
        for name, model in ((f"{method.upper()} pretrained", trained), (f"{method.upper()} random weights", random)):
            rows.append({"features": f"{name} ({feature})", "knn_top1": knn_accuracy(backbone_features(model, feature), train_dir, test_dir, 32)})
        timings[f"{method}_knn_s"] = time.perf_counter() - t

        t = time.perf_counter()
        test_images = sorted(p for p in test_dir.rglob("*.png"))[::36][:10]
        if method == "mae":
            from ssl_vit.viz.reconstruction import visualize_mae

            grids = visualize_mae(ckpt, test_images, run_dir / "reconstructions", seed=seed)
            paths["mae_reconstructions"] = str(grids[0])
        else:
            from ssl_vit.viz.gallery import export_attention

            export_attention(trained, test_images, run_dir / "attention", image_size=32, progress=False)
            paths["dino_attention"] = str(run_dir / "attention" / "index.html")
        timings[f"{method}_pictures_s"] = time.perf_counter() - t

    timings["total_s"] = time.perf_counter() - t0
    notes = []
    knn = {row["features"].split(" (")[0]: row["knn_top1"] for row in rows}
    for method in methods:
        name = method.upper()
        if knn[f"{name} pretrained"] <= knn[f"{name} random weights"]:
            notes.append(f"{name} did not beat its random-weight baseline within the demo's budget "
                         f"(see recipes/demo/{method}_digits.yaml)")
    summary = {
        "data": {"dataset": "scikit-learn digits, 32x32", "train": digits["train"], "test": digits["test"]},
        "knn": {"k": KNN_K, "temperature": KNN_T, "metric": "cosine"},
        "results": rows,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "paths": paths,
        "notes": notes,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_table(summary: Dict[str, Any]) -> str:
    width = max(len(r["features"]) for r in summary["results"])
    lines = [f"{'features':<{width}}  k-NN top-1 (held-out digits)", f"{'-' * width}  {'-' * 28}"]
    lines += [f"{r['features']:<{width}}  {100 * r['knn_top1']:5.1f}%" for r in summary["results"]]
    lines += [f"note: {note}" for note in summary["notes"]]
    lines.append(f"total time {summary['timings']['total_s']:.0f} s; details in summary.json")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog="ssl-vit demo", description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=Path("runs/demo"), help="folder for everything the demo writes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=["mae", "dino"], choices=["mae", "dino"])
    p.add_argument("--mae-epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--dino-epochs", type=int, default=None, help="override the recipe's epochs")
    args = p.parse_args(argv)
    for name in ("mae_epochs", "dino_epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    summary = run_demo(args.output, args.seed, args.mae_epochs, args.dino_epochs, args.methods)
    print(format_table(summary))
    print(f"outputs in {args.output}/ (summary.json, mae/reconstructions/, dino/attention/index.html)")
    return summary
