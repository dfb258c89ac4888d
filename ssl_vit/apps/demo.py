"""`ssl-vit demo`: a complete small run on data that ships with scikit-learn, on CPU, in minutes.

1. writes scikit-learn's 1,797 handwritten digits as 32x32 images (train / held-out test split)
   and turns the train and test folders into webdataset shards;
2. pretrains a small MAE and a small DINO through `ssl-vit fit` with the packaged recipes demo/*.yaml,
   side by side (MAE in a second process, one core each: each run's single torch thread leaves most
   of a 2-core machine idle) unless ``--sequential``;
3. evaluates the frozen features of each pretrained backbone, of the same architecture with random
   weights, and of raw pixels, on the held-out split: k-NN (k=20, cosine, T=0.07) with every
   training label, and a linear probe that sees only 5 labelled images per digit (10 random draws);
4. writes MAE reconstruction grids, DINO attention maps, a t-SNE scatter of the DINO features, and
   ``index.html``, one page showing all of it (``ssl_vit.apps.demo_report``).

Everything goes under ``--output``; ``summary.json`` holds the numbers, timings and paths. One line
is printed per stage as it finishes; each pretraining shows a progress bar (on a terminal) or a
line every quarter of the run (elsewhere).
"""
import argparse
import contextlib
import json
import logging
import math
import multiprocessing
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TextIO

import pytorch_lightning as pl
import torch
from sklearn.manifold import TSNE
from tqdm import tqdm

from ssl_vit.apps.demo_report import format_table, tsne_svg, write_index_html
from ssl_vit.apps.runs import (
    KNN_K, KNN_T, backbone_features, few_label_probe, image_loader, knn_top1, run_cli, split_features,
)
from ssl_vit.apps.runs import shard_pattern as _shard_pattern
from ssl_vit.checkpoints.load import load_backbone
from ssl_vit.data import export_digits, write_shards
from ssl_vit.eval.features import extract_features
from ssl_vit.losses.dino import teacher_stats
from ssl_vit.methods.dino import DINO
from ssl_vit.models.backbone import create_backbone
from ssl_vit.recipes import RECIPES_DIR
from ssl_vit.viz.gallery import export_attention
from ssl_vit.viz.reconstruction import visualize_mae

RECIPES = RECIPES_DIR / "demo"
IMAGE_SIZE = 32
FEW_LABELS, FEW_LABEL_DRAWS = 5, 10
# a teacher entropy above this fraction of log K is reported as a partial collapse (seen: 1.4 of 6.9 nats
# in a healthy demo run, 5.7 in a collapsed one; recipes/demo/dino_digits.yaml)
COLLAPSE_FRACTION = 0.5
# MAE's representation is the mean patch token; DINO's the CLS token (each method's protocol).
FEATURE_OF = {"mae": "avg", "dino": "cls"}
LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")
# Lightning's advice that does not apply to a 1.4k-image CPU run (no validation loader, few batches)
QUIET_WARNINGS = (r".*`IterableDataset` has `__len__` defined.*", r".*Total length of .* across ranks is zero.*",
                  r".*smaller than the logging interval.*", r".*does not have many workers.*",
                  r".*but have no `validation_step`.*", r".*treespec, LeafSpec.*is deprecated.*")


class StageProgress(pl.Callback):
    """One progress bar over a whole fit (every epoch), with the loss.

    On a terminal it is a tqdm bar that disappears when the fit ends; when ``stream`` is not a
    terminal (a log file, CI) it prints a plain line at every quarter of the run instead. The
    recipes in ``recipes/demo/`` use it with ``trainer.enable_progress_bar: false``.
    """
    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self.stream = stream
        self.bar: Optional[tqdm] = None
        self.total, self.next_quarter = 1, 1

    def _stream(self) -> TextIO:
        return self.stream or sys.stdout

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.total = max(int(trainer.estimated_stepping_batches), 1)
        self.next_quarter = 1
        stream = self._stream()
        if stream.isatty():
            self.bar = tqdm(total=self.total, desc=f"  {type(pl_module).__name__}", unit="step", file=stream,
                            leave=False, dynamic_ncols=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        loss = trainer.callback_metrics.get("train/loss_step", trainer.callback_metrics.get("train/loss"))
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if loss is not None and step % 10 == 0:
                self.bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
        elif step >= self.next_quarter * self.total / 4 and self.next_quarter < 4:
            loss_text = "" if loss is None else f", loss {float(loss):.3f}"
            print(f"  {type(pl_module).__name__}: step {step}/{self.total}{loss_text}", file=self._stream(), flush=True)
            self.next_quarter += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def quiet_run(threads: int) -> Iterator[None]:
    """While the demo runs: Lightning's info lines (accelerators, "`Trainer.fit` stopped") and
    inapplicable warnings off, and ``threads`` torch threads. Everything is restored afterwards."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    old_threads = torch.get_num_threads()
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        torch.set_num_threads(threads)
        with warnings.catch_warnings():
            for message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        torch.set_num_threads(old_threads)


def _pretrain(recipe: Path, train: str, run_dir: Path, epochs: Optional[int], seed: int) -> Dict[str, Any]:
    """`ssl-vit fit` with a demo recipe; returns ``{"checkpoint", "steps"}``."""
    if not recipe.is_file():
        raise FileNotFoundError(f"demo recipe {recipe} is missing: this installation of ssl_vit lacks its recipes "
                                "(reinstall it: `pip install .` ships them as package data)")
    args = ["fit", "--config", str(recipe), "--data.train", train, "--trainer.default_root_dir", str(run_dir),
            "--seed_everything", str(seed)]
    if epochs is not None:
        args += ["--trainer.max_epochs", str(epochs)]
    cli = run_cli(args, stage=f"demo {recipe.stem}")
    ckpt = run_dir / "last.ckpt"
    cli.trainer.save_checkpoint(ckpt, weights_only=False)  # full state: a run can resume from it
    return {"checkpoint": ckpt, "steps": int(cli.trainer.global_step)}


def _pretrain_job(recipe: Path, train: str, run_dir: Path, epochs: Optional[int], seed: int, threads: int,
                  log: Path, result: Path, start_method: str) -> None:
    """The background pretraining (a spawned process): :func:`_pretrain` with everything it prints in
    ``log``, then ``{"checkpoint", "steps", "seconds"}`` or ``{"error"}`` written to ``result``.

    ``start_method``: the parent's, for the run's data loader workers. A spawned process inherits
    "spawn", under which each epoch's worker would start a fresh interpreter and import torch again
    (measured: 12 MAE demo epochs took 85 s instead of 18 s)."""
    multiprocessing.set_start_method(start_method, force=True)
    with open(log, "w") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        start = time.perf_counter()
        try:
            with quiet_run(threads):
                run = _pretrain(recipe, train, run_dir, epochs, seed)
            out = {"checkpoint": str(run["checkpoint"]), "steps": run["steps"], "seconds": time.perf_counter() - start}
        except BaseException as err:  # reported by the parent, which names the log
            traceback.print_exc()
            out = {"error": f"{type(err).__name__}: {err}"}
    result.write_text(json.dumps(out))
    if "error" in out:
        sys.exit(1)


class BackgroundPretrain:
    """One demo pretraining in a spawned process, beside the one in the foreground.

    Its output goes to ``<run_dir>/fit.log`` (the progress as plain quarter lines). :meth:`join` waits
    and returns what :func:`_pretrain` returns plus ``seconds``, or raises ``RuntimeError`` with the
    error and the log's path; :meth:`stop` ends it early (the foreground failed or was interrupted).
    """
    def __init__(self, recipe: Path, train: str, run_dir: Path, epochs: Optional[int], seed: int, threads: int) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.name = recipe.stem
        self.log, self.result = run_dir / "fit.log", run_dir / "fit_result.json"
        self.result.unlink(missing_ok=True)
        # spawn: a fresh interpreter rather than a copy of the parent mid-run (its torch state, open
        # loaders); not a daemon: the child's own data loader worker is its child
        self.process = multiprocessing.get_context("spawn").Process(
            target=_pretrain_job,
            args=(recipe, train, run_dir, epochs, seed, threads, self.log, self.result,
                  multiprocessing.get_start_method()),
            name=f"demo {self.name}")
        self.process.start()

    def join(self) -> Dict[str, Any]:
        self.process.join()
        out = json.loads(self.result.read_text()) if self.result.is_file() else {}
        if self.process.exitcode != 0 or "checkpoint" not in out:
            why = out.get("error", f"exit code {self.process.exitcode}")
            raise RuntimeError(f"demo {self.name} (run in the background) failed: {why}; its log: {self.log}")
        return {"checkpoint": Path(out["checkpoint"]), "steps": int(out["steps"]), "seconds": float(out["seconds"])}

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join()


class _Clock:
    """Stage timer that prints one line per finished stage: ``[elapsed] what (stage time)``."""
    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()

    def lap(self, what: str, seconds: Optional[float] = None) -> float:
        """Print the stage line; its time is the time since the last line unless ``seconds`` is given
        (a stage that ran beside the others)."""
        now = time.perf_counter()
        lap, self.mark = now - self.mark, now
        seconds = lap if seconds is None else seconds
        print(f"[{now - self.start:4.0f} s] {what} ({seconds:.1f} s)", flush=True)
        return seconds

    def total(self) -> float:
        return time.perf_counter() - self.start


def _evaluate(name: str, feature_fn: Callable[[torch.Tensor], torch.Tensor], train_dir: Path, test_dir: Path,
              seed: int, draws: int) -> Dict[str, Any]:
    """k-NN and the few-label probe of one feature function; the test features are kept (t-SNE)."""
    feats = split_features(feature_fn, train_dir, test_dir, IMAGE_SIZE)
    row = {"features": name, "knn_top1": knn_top1(*feats),
           "few_label": few_label_probe(*feats, per_class=FEW_LABELS, draws=draws, seed=seed)}
    return {"row": row, "test_features": feats[2], "test_labels": feats[3]}


def dino_teacher_health(model: DINO, images: Path) -> Dict[str, float]:
    """Collapse indicators of a trained DINO teacher on the ImageFolder tree ``images``:
    :func:`ssl_vit.losses.dino.teacher_stats` of its logits with the final centre and teacher
    temperature, and ``uniform`` = ``log K``, the entropy of a uniform output. An entropy near
    ``uniform`` is the partial collapse that leaves the demo's DINO features weak (its recipe)."""
    model.eval()
    with torch.no_grad():
        logits, _ = extract_features(model.teacher, image_loader(images, IMAGE_SIZE))  # [N, K]
    stats = teacher_stats(logits, model.loss.center, model.teacher_temp)
    return {"entropy": round(float(stats["entropy"]), 3), "kl_to_centre": round(float(stats["kl_to_centre"]), 3),
            "uniform": round(math.log(logits.shape[1]), 3)}


def _describe(row: Dict[str, Any]) -> str:
    probe = row["few_label"]
    return (f"{row['features']}: k-NN {100 * row['knn_top1']:.1f}%, {probe['per_class']}-label probe "
            f"{100 * probe['mean']:.1f}% ± {100 * probe['std']:.1f}")


def run_demo(
    output: Path, seed: int = 0, mae_epochs: Optional[int] = None, dino_epochs: Optional[int] = None,
    methods: Sequence[str] = ("mae", "dino"), threads: Optional[int] = None, draws: int = FEW_LABEL_DRAWS,
    sequential: bool = False,
) -> Dict[str, Any]:
    """Run the demo into ``output`` and return the summary (also written to ``summary.json``).

    Args:
        threads: torch threads of each pretraining; default one fewer than the CPU cores when one runs
            at a time (the recipes' single data loader worker gets the other), ``(cores - 2) // 2``
            (at least 1) when two run side by side.
        draws: random draws of the few-label probe.
        sequential: pretrain one method after the other. By default, when both methods run on a
            machine with 2 cores or more, MAE trains in a second process beside DINO.
    """
    unknown = set(methods) - {"mae", "dino"}
    if unknown or not methods:
        raise ValueError(f"--methods takes mae and/or dino, got {sorted(methods)}")
    cores = os.cpu_count() or 1
    beside = not sequential and len(methods) == 2 and cores >= 2
    if threads is None:
        threads = max(1, (cores - 2) // 2) if beside else max(1, cores - 1)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, float] = {}
    paths: Dict[str, Any] = {}
    clock = _Clock()
    with quiet_run(threads):
        data = output / "data"
        digits = export_digits(data, size=IMAGE_SIZE, seed=seed, overwrite=True)
        train_dir, test_dir = data / "train", data / "test"
        shards = output / "shards"
        info = write_shards(train_dir, shards, "train", shard_size=512, seed=seed, overwrite=True, progress=False)
        write_shards(test_dir, shards, "test", shard_size=512, seed=seed, overwrite=True, progress=False)
        train_pattern = _shard_pattern(info, shards)
        timings["data_s"] = clock.lap(f"data: {digits['train']} train + {digits['test']} held-out digits, "
                                      f"{IMAGE_SIZE}x{IMAGE_SIZE}, as images and shards")
        paths.update(images=str(data), shards=str(shards))

        epochs = {"mae": mae_epochs, "dino": dino_epochs}
        job = {m: (RECIPES / f"{m}_digits.yaml", train_pattern, output / m, epochs[m], seed) for m in methods}
        runs: Dict[str, Dict[str, Any]] = {}
        background = BackgroundPretrain(*job["mae"], threads=threads) if beside else None
        try:
            for method in (m for m in methods if background is None or m != "mae"):
                runs[method] = _pretrain(*job[method])
                timings[f"{method}_pretrain_s"] = clock.lap(f"{method.upper()} pretraining: {runs[method]['steps']} "
                                                            f"steps, checkpoint {runs[method]['checkpoint']}")
            if background is not None:
                runs["mae"] = background.join()
                timings["mae_pretrain_s"] = clock.lap(
                    f"MAE pretraining, beside DINO: {runs['mae']['steps']} steps, checkpoint "
                    f"{runs['mae']['checkpoint']}, log {background.log}", seconds=runs["mae"]["seconds"])
        finally:
            if background is not None:
                background.stop()

        rows: List[Dict[str, Any]] = []
        pixels = _evaluate("raw pixels", lambda images: images.flatten(1), train_dir, test_dir, seed, draws)
        timings["pixels_eval_s"] = clock.lap(_describe(pixels["row"]))
        rows.append({**pixels["row"], "stage": "evaluate", "time_s": timings["pixels_eval_s"]})
        tsne_features, teacher = None, None
        for method in methods:
            name, feature, run_dir = method.upper(), FEATURE_OF[method], output / method
            ckpt = runs[method]["checkpoint"]
            paths[f"{method}_checkpoint"] = str(ckpt)

            meta = torch.load(ckpt, map_location="cpu", weights_only=True)["ssl_vit"]
            trained = load_backbone(ckpt)
            torch.manual_seed(seed)
            random = create_backbone(meta["arch"], **meta["backbone_kwargs"])
            result = _evaluate(f"{name} pretrained ({feature})", backbone_features(trained, feature),
                               train_dir, test_dir, seed, draws)
            timings[f"{method}_eval_s"] = clock.lap(_describe(result["row"]))
            rows.append({**result["row"], "stage": "pretrain", "time_s": timings[f"{method}_pretrain_s"]})
            if method == "dino":
                tsne_features = (result["test_features"], result["test_labels"])
                teacher = dino_teacher_health(DINO.load_from_checkpoint(ckpt, map_location="cpu"), train_dir)
                timings["dino_teacher_s"] = clock.lap(
                    f"DINO teacher: output entropy {teacher['entropy']:.1f} nats on the training digits "
                    f"({teacher['uniform']:.1f} = uniform, collapsed)")
            baseline = _evaluate(f"{name} random weights ({feature})", backbone_features(random, feature),
                                 train_dir, test_dir, seed, draws)
            timings[f"{method}_random_eval_s"] = clock.lap(_describe(baseline["row"]))
            rows.append({**baseline["row"], "stage": "evaluate", "time_s": timings[f"{method}_random_eval_s"]})

            test_images = sorted(p for p in test_dir.rglob("*.png"))[::36][:10]
            if method == "mae":
                grids = visualize_mae(ckpt, test_images, run_dir / "reconstructions", seed=seed, progress=False)
                paths["mae_reconstructions"] = str(grids[0])
                paths["mae_reconstruction_pages"] = [str(g) for g in grids]
            else:
                export_attention(trained, test_images, run_dir / "attention", image_size=IMAGE_SIZE, progress=False)
                paths["dino_attention"] = str(run_dir / "attention" / "index.html")
            timings[f"{method}_pictures_s"] = clock.lap(f"{name} pictures under {run_dir}")

        svg = ""
        if tsne_features is not None:
            feats, labels = tsne_features
            feats = torch.nn.functional.normalize(feats.float(), dim=1).numpy()
            points = TSNE(n_components=2, init="pca", perplexity=30, random_state=seed).fit_transform(feats)
            svg = tsne_svg(points, labels.tolist(), title="t-SNE of DINO features")
            timings["tsne_s"] = clock.lap("t-SNE of the DINO features of the held-out digits")

    timings["total_s"] = clock.total()
    notes = []
    knn = {row["features"].split(" (")[0]: row["knn_top1"] for row in rows}
    for method in methods:
        name = method.upper()
        if knn[f"{name} pretrained"] <= knn[f"{name} random weights"]:
            notes.append(f"{name} did not beat its random-weight baseline within the demo's budget "
                         f"(see recipes/demo/{method}_digits.yaml)")
    if teacher is not None and teacher["entropy"] > COLLAPSE_FRACTION * teacher["uniform"]:
        notes.append(f"DINO's teacher output is close to uniform (entropy {teacher['entropy']:.1f} of "
                     f"{teacher['uniform']:.1f} nats): a partial collapse, which leaves its features weak "
                     "(see recipes/demo/dino_digits.yaml)")
    summary = {
        "data": {"dataset": "scikit-learn digits, 32x32", "train": digits["train"], "test": digits["test"]},
        "knn": {"k": KNN_K, "temperature": KNN_T, "metric": "cosine"},
        "few_label": {"per_class": FEW_LABELS, "draws": draws, "classifier": "logistic regression on standardised features (train-set mean and std, no labels)"},
        "methods": list(methods),
        "side_by_side": beside,
        "results": rows,
        "dino_teacher": teacher,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "paths": paths,
        "notes": notes,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    paths["index"] = str(write_index_html(output, summary, svg))
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog="ssl-vit demo", description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=Path("runs/demo"), help="folder for everything the demo writes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=["mae", "dino"], choices=["mae", "dino"])
    p.add_argument("--mae-epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--dino-epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of each pretraining (default: CPU cores - 1 when one runs at a time, leaving "
                        "a core to its data loader worker; (cores - 2) // 2, at least 1, when two run side by side)")
    p.add_argument("--sequential", action="store_true",
                   help="pretrain MAE, then DINO (default: side by side, MAE in a second process, when both run "
                        "and the machine has 2 cores or more)")
    p.add_argument("--probe-draws", type=int, default=FEW_LABEL_DRAWS,
                   help=f"random draws of the {FEW_LABELS}-label probe (default {FEW_LABEL_DRAWS})")
    args = p.parse_args(argv)
    for name in ("mae_epochs", "dino_epochs", "threads", "probe_draws"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.output.exists() and not args.output.is_dir():
        p.error(f"--output {args.output} exists and is not a folder")
    summary = run_demo(args.output, args.seed, args.mae_epochs, args.dino_epochs, args.methods, args.threads,
                       args.probe_draws, sequential=args.sequential)
    print(format_table(summary))
    print(f"open {args.output / 'index.html'} in a browser: the table, MAE reconstructions, DINO attention "
          "maps and a t-SNE of the DINO features")
    return summary
