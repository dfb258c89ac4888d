"""The CIFAR-10 quality benchmark: every stage, run through the recipes.

Stages, in the order they run (``STAGES``), each writing ``<output>/<stage>/result.json``:

1. ``data``: unpack (or subset) the images, write train / val shards (:mod:`ssl_vit.apps.quality.data`);
2. ``pixels_knn``: k-NN on raw pixels;
3. ``dino_pretrain``, ``mae_pretrain``: ``ssl-vit fit`` of the pretraining recipe in a child process
   each; the epochs come from ``--epochs`` or from a timed two-epoch run (:mod:`ssl_vit.apps.quality.plan`),
   ``trainer.max_time`` is the budget's hard stop;
4. ``<m>_knn`` (``ssl-vit validate``, k = 20, T = 0.07) and ``<m>_linear`` (cached-feature probe) of
   each pretrained backbone, and ``random_<m>_knn``, ``random_<m>_linear`` of the same architecture
   with random weights;
5. ``gallery``: the DINO teacher's attention on 16 test images (``attention_gallery.png``);
6. ``dino_finetune``, ``mae_finetune``, and ``scratch`` (the supervised baseline: the finetune budget
   from random weights), the most expensive stages, last.

Every recipe runs as written, with a second ``--config`` (``<stage>/overrides.yaml``) pointing it at
the benchmark's data and directories (checkpoint ``dirpath`` of any callback, CSV logger), the device
and the reduced-run switches; the evaluation stages keep no checkpoints. Figures are read back from
the CSV logger's ``metrics.csv``. Evaluation stages run in child processes too unless
``--in-process``. A failed stage raises :class:`~ssl_vit.apps.runs.StageError` naming it, after writing
the partial results. ``--resume`` skips a stage whose ``result.json`` exists and resumes an
interrupted pretraining from its last checkpoint with its first plan; ``--stop-after STAGE`` ends a
command after that stage, so a run can be split into commands of bounded length.
"""
import csv
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import yaml

from ssl_vit.apps.quality import data as qdata
from ssl_vit.apps.quality import plan as qplan
from ssl_vit.apps.quality import report
from ssl_vit.apps.quality.overrides import StageData, put, recipe_overrides
from ssl_vit.apps.runs import KNN_K, KNN_T, StageError, knn_accuracy, run_cli, run_cli_subprocess
from ssl_vit.checkpoints.load import load_backbone, read_backbone
from ssl_vit.recipes import RECIPES_DIR
from ssl_vit.viz.gallery import export_attention

RECIPES = {
    "dino_pretrain": "dino/vit_small_patch4_cifar10.yaml",
    "mae_pretrain": "mae/vit_small_patch4_cifar10.yaml",
    "dino_knn": "probe/knn_vit_small_patch4_cifar10.yaml",
    "mae_knn": "probe/knn_mae_vit_small_patch4_cifar10.yaml",
    "dino_linear": "probe/dino_linear_vit_small_patch4_cifar10_cached.yaml",
    "mae_linear": "probe/mae_linear_vit_small_patch4_cifar10_cached.yaml",
    "finetune": "finetune/vit_small_patch4_cifar10.yaml",
    "scratch": "finetune/vit_small_patch4_scratch_cifar10.yaml",
}
TINY_BACKBONE = {"embed_dim": 32, "depth": 1, "num_heads": 2}
TINY_MODEL = {  # --tiny: model init_args per pretraining recipe
    "dino_pretrain": {**TINY_BACKBONE, "out_dim": 64, "head_hidden_dim": 64, "head_bottleneck_dim": 32},
    "mae_pretrain": {**TINY_BACKBONE, "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
}
STAGES = (  # in the order they run
    "data", "pixels_knn", "dino_pretrain", "mae_pretrain", "dino_knn", "dino_linear", "random_dino_knn",
    "random_dino_linear", "mae_knn", "mae_linear", "random_mae_knn", "random_mae_linear", "gallery",
    "dino_finetune", "mae_finetune", "scratch",
)
TIMED_EPOCHS = 2
IMAGE_SIZE = 32
GALLERY_FILE = "attention_gallery.png"


@dataclass
class QualityOptions:
    """What ``tools/bench_quality.py`` takes (see its ``--help``)."""
    data: Path
    output: Path
    budget_minutes: float = 30.0
    epochs: Optional[int] = None
    probe_epochs: Optional[int] = None
    finetune_epochs: Optional[int] = None
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    tiny: bool = False
    device: str = "auto"
    batch_size: Optional[int] = None
    workers: Optional[int] = None
    seed: int = 0
    in_process: bool = False
    resume: bool = False
    gallery_images: int = 16
    stop_after: Optional[str] = None
    recipes: Dict[str, str] = field(default_factory=dict)
    command: str = ""

    def reduced(self) -> str:
        """Why this run is not a quality measurement: a data subset or tiny models ('' otherwise)."""
        why = [f"--limit-{s} {v}" for s, v in (("train", self.limit_train), ("test", self.limit_test)) if v is not None]
        return ", ".join(why + (["--tiny"] if self.tiny else []))


def final_metric(stage_dir: Path, key: str, stage: str) -> float:
    """The last logged ``key`` of the newest ``<stage_dir>/csv/version_*/metrics.csv``, in [0, 1]."""
    files = sorted(stage_dir.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1]))
    if not files:
        raise StageError(f"stage {stage!r}: no metrics.csv under {stage_dir / 'csv'} (did the run log anything?)")
    with open(files[-1], newline="") as f:
        values = [row[key] for row in csv.DictReader(f) if row.get(key) not in (None, "")]
    if not values:
        raise StageError(f"stage {stage!r}: {files[-1]} has no {key!r} column value")
    value = float(values[-1])
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise StageError(f"stage {stage!r}: {key} = {value} is not a fraction in [0, 1]")
    return round(value, 6)  # torchmetrics computes in float32


class _StopAfter(Exception):
    """``--stop-after``: the named stage is done."""


class Bench:
    """One benchmark run into ``opts.output`` (see the module docstring)."""
    def __init__(self, opts: QualityOptions) -> None:
        positive = dict(epochs=opts.epochs, probe_epochs=opts.probe_epochs, finetune_epochs=opts.finetune_epochs,
                        limit_train=opts.limit_train, limit_test=opts.limit_test, batch_size=opts.batch_size,
                        gallery_images=opts.gallery_images)
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if opts.workers is not None and opts.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {opts.workers}")
        if not opts.budget_minutes > 0:
            raise ValueError(f"--budget-minutes must be > 0, got {opts.budget_minutes}")
        if opts.device not in ("auto", "gpu", "cpu"):
            raise ValueError(f"--device must be auto, gpu or cpu, got {opts.device!r}")
        if opts.stop_after is not None and opts.stop_after not in STAGES:
            raise ValueError(f"--stop-after must be a stage name ({', '.join(STAGES)}), got {opts.stop_after!r}")
        unknown = set(opts.recipes) - set(RECIPES)
        if unknown:
            raise ValueError(f"--recipe: unknown stage(s) {sorted(unknown)}; known: {sorted(RECIPES)}")
        if not Path(opts.data).exists():
            raise FileNotFoundError(f"--data {opts.data} does not exist (an archive or a folder with train/ and test/)")
        self.opts = opts
        self.out = Path(opts.output)
        self.recipes = {k: Path(opts.recipes.get(k) or RECIPES_DIR / v) for k, v in RECIPES.items()}
        for key, path in self.recipes.items():
            if not path.is_file():
                raise FileNotFoundError(f"recipe for {key} not found: {path} (run from a checkout of ssl_vit)")
        if self.out.exists() and any(self.out.iterdir()) and not opts.resume:
            raise FileExistsError(f"{self.out} is not empty: give --resume to continue that run, or another --output")
        self.stages: Dict[str, Dict[str, Any]] = {}
        self.current = ""
        self.images: Dict[str, Any] = {}
        self.shards: Dict[str, str] = {}

    # -- plumbing ---------------------------------------------------------------------------------
    def stage(self, name: str, fn: Callable[[Path], Dict[str, Any]]) -> Dict[str, Any]:
        """Run ``fn(stage_dir)`` unless ``--resume`` finds its result; record and return the result."""
        self.current = name
        stage_dir = self.out / name
        done = stage_dir / "result.json"
        if self.opts.resume and done.is_file():
            result = json.loads(done.read_text())
            print(f"[bench_quality] {name}: done before, skipped", flush=True)
        else:
            print(f"[bench_quality] {name} ...", flush=True)
            stage_dir.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            try:
                result = fn(stage_dir)
            except StageError:
                raise
            except Exception as err:
                raise StageError(f"stage {name!r} failed: {type(err).__name__}: {err}") from err
            result.setdefault("minutes", round((time.perf_counter() - start) / 60, 3))
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            tmp.replace(done)
            shown = f"{result['metric']} = {result['value']:.4f}" if "value" in result else result.get("summary", "")
            print(f"[bench_quality] {name}: {shown} ({result['minutes']:.2f} min)", flush=True)
        self.stages[name] = result
        if name == self.opts.stop_after:
            raise _StopAfter(name)
        return result

    def _recipe(self, key: str) -> Dict[str, Any]:
        return yaml.safe_load(self.recipes[key].read_text())

    def overrides(self, key: str, stage_dir: Path, epochs: Optional[int] = None) -> Dict[str, Any]:
        """The second ``--config`` of a stage: data, directories, logger, device, epochs."""
        data = StageData(folders=self.images, shards=self.shards, seed=self.opts.seed, device=self.opts.device,
                         workers=self.opts.workers, batch_size=self.opts.batch_size)
        return recipe_overrides(self._recipe(key), stage_dir, data, epochs)

    def run_stage_cli(self, name: str, stage_dir: Path, command: str, key: str, ov: Dict[str, Any], child: bool,
                      extra: List[str] = (), timeout: Optional[float] = None) -> Dict[str, Any]:
        """``ssl-vit COMMAND --config RECIPE --config OVERRIDES`` in a child process (output in
        ``<stage_dir>/log.txt``) or in this one."""
        cfg = stage_dir / "overrides.yaml"
        cfg.write_text(yaml.safe_dump(ov, sort_keys=False))
        args = [command, "--config", str(self.recipes[key]), "--config", str(cfg), *extra]
        start = time.perf_counter()
        if child:
            log = stage_dir / "log.txt"
            run_cli_subprocess(args, name, log, timeout=timeout)
        else:
            log = None
            run_cli(args, stage=name)
        return {"command": "ssl-vit " + shlex.join(args), "log": str(log) if log else None, "wall_s": time.perf_counter() - start}

    # -- stages -----------------------------------------------------------------------------------
    def data_stage(self, stage_dir: Path) -> Dict[str, Any]:
        images = qdata.prepare_images(self.opts.data, stage_dir / "images", self.opts.limit_train, self.opts.limit_test)
        shards = qdata.make_shards(images, stage_dir / "shards", seed=self.opts.seed)
        c = images["counts"]
        return {"images": images, "shards": shards, "summary": f"{c['train']} train / {c['test']} test images"}

    def pixels_stage(self, stage_dir: Path) -> Dict[str, Any]:
        workers = self.opts.workers if self.opts.workers is not None else min(8, os.cpu_count() or 1)
        train, test = Path(self.images["train"]), Path(self.images["test"])
        value = knn_accuracy(lambda x: x.flatten(1), train, test, IMAGE_SIZE, num_workers=workers)  # [B, 3 * 32 * 32]
        return {"metric": "knn_top1", "value": value}

    def pretrain_stage(self, method: str, stage_dir: Path) -> Dict[str, Any]:
        key = f"{method}_pretrain"
        budget_s = 60.0 * self.opts.budget_minutes
        tiny = {f"model.init_args.{k}": v for k, v in TINY_MODEL[key].items()} if self.opts.tiny else {}
        if self.opts.tiny and method == "dino":
            tiny["data.init_args.train_transform.init_args.num_local"] = 2
        plan_file = stage_dir / "plan.json"
        if plan_file.is_file():  # an interrupted run being resumed keeps its plan (and schedules)
            plan = json.loads(plan_file.read_text())
        else:
            plan = self._plan(key, stage_dir, budget_s, tiny)
            plan_file.write_text(json.dumps(plan, indent=2) + "\n")
        ov = self.overrides(key, stage_dir, epochs=plan["epochs"])
        for dotted, value in tiny.items():
            put(ov, dotted, value)
        put(ov, "trainer.max_time", qplan.max_time(plan["max_time_s"]))
        final, record_file = stage_dir / "final.ckpt", stage_dir / "record.json"
        ov["trainer"]["callbacks"].append({"class_path": "ssl_vit.apps.quality.plan.RunRecord",
                                           "init_args": {"path": str(record_file), "checkpoint": str(final)}})
        last = sorted((stage_dir / "checkpoints").glob("**/last*.ckpt"), key=lambda p: p.stat().st_mtime)
        extra = ["--ckpt_path", str(last[-1])] if self.opts.resume and last else []
        runs = json.loads((stage_dir / "invocations.json").read_text()) if (stage_dir / "invocations.json").is_file() else []
        for run in runs:  # a run killed part-way: count it up to its last checkpoint
            if run["end"] is None:
                run["end"] = max([run["start"]] + [p.stat().st_mtime for p in last])
        runs.append({"start": time.time(), "end": None, "resumed_from": extra[-1] if extra else None})
        (stage_dir / "invocations.json").write_text(json.dumps(runs, indent=2))
        run = self.run_stage_cli(key, stage_dir, "fit", key, ov, child=True, extra=extra, timeout=2 * budget_s + 600)
        runs[-1]["end"] = time.time()
        (stage_dir / "invocations.json").write_text(json.dumps(runs, indent=2))
        record = json.loads(record_file.read_text())
        loaded = read_backbone(final)
        steps = record["steps_per_epoch"]
        epochs = round(record["global_step"] / steps, 2) if steps else record["epochs_completed"]
        epochs = int(epochs) if float(epochs).is_integer() else epochs
        if record["stopped_early"]:
            print(f"[bench_quality] WARNING {key}: stopped by the time budget after {epochs} of {plan['epochs']} epochs: "
                  "its schedules were cut", file=sys.stderr, flush=True)
        minutes = (plan.get("timed_wall_s", 0.0) + sum(r["end"] - r["start"] for r in runs)) / 60
        return {
            **run, "checkpoint": str(final), "arch": loaded.arch, "backbone_kwargs": loaded.kwargs,
            "architecture": report.architecture(loaded.arch, loaded.kwargs), "epochs": epochs,
            "epochs_planned": plan["epochs"], "stopped_early": record["stopped_early"], "plan": plan, "record": record,
            "minutes": round(minutes, 3), "summary": f"{epochs} epochs in {minutes:.1f} min",
        }

    def _plan(self, key: str, stage_dir: Path, budget_s: float, tiny: Dict[str, Any]) -> Dict[str, Any]:
        """``--epochs``, or the epochs a timed run says fit the budget."""
        if self.opts.epochs is not None:
            return {"epochs": self.opts.epochs, "max_time_s": budget_s, "how": f"--epochs {self.opts.epochs}"}
        timed_dir = stage_dir / "timed"
        timed_dir.mkdir(exist_ok=True)
        ov = self.overrides(key, timed_dir, epochs=TIMED_EPOCHS)
        for dotted, value in tiny.items():
            put(ov, dotted, value)
        record_file = timed_dir / "record.json"
        ov["trainer"].update(callbacks=[{"class_path": "ssl_vit.apps.quality.plan.RunRecord", "init_args": {"path": str(record_file)}}],
                             logger=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0)
        run = self.run_stage_cli(f"{key} (timed run)", timed_dir, "fit", key, ov, child=True, timeout=budget_s)
        timed = {**json.loads(record_file.read_text()), "wall_s": run["wall_s"]}
        fit = qplan.plan_epochs(budget_s, run["wall_s"], timed)
        images = self.stages["data"]["images"]["counts"]["train"]
        how = (f"{fit['epochs']} planned from a timed run of {TIMED_EPOCHS} epochs ({fit['epoch_s']:.1f} s per epoch after "
               f"the first, ~{images / fit['epoch_s']:,.0f} img/s; {run['wall_s']:.0f} s in all) to end within the budget")
        return {**fit, "timed_wall_s": run["wall_s"], "timed": timed, "how": how}

    def eval_stage(self, name: str, key: str, stage_dir: Path, command: str, model: Dict[str, Any],
                   epochs: Optional[int] = None) -> Dict[str, Any]:
        ov = self.overrides(key, stage_dir, epochs=epochs)
        for arg, value in model.items():
            put(ov, f"model.init_args.{arg}", value)
        # the figure is read from the CSV log: no checkpoints of the evaluation stages
        ov["trainer"]["callbacks"] = [c for c in ov["trainer"]["callbacks"] if "dirpath" not in c["init_args"]]
        if command == "fit":
            ov["trainer"]["enable_checkpointing"] = False
        run = self.run_stage_cli(name, stage_dir, command, key, ov, child=not self.opts.in_process)
        metric = "val/knn_top1" if command == "validate" else "val/top1"
        recipe_epochs = self._recipe(key).get("trainer", {}).get("max_epochs")
        return {**run, "metric": metric, "value": final_metric(stage_dir, metric, name),
                "epochs": (epochs or recipe_epochs) if command == "fit" else None, "minutes": round(run["wall_s"] / 60, 3)}

    def gallery_stage(self, stage_dir: Path) -> Dict[str, Any]:
        images = qdata.gallery_images(Path(self.images["test"]), self.opts.gallery_images)
        model = load_backbone(self.stages["dino_pretrain"]["checkpoint"])
        result = export_attention(model, images, stage_dir / "attention", image_size=IMAGE_SIZE, progress=False)
        sheet = self.out / GALLERY_FILE
        report.attention_sheet(stage_dir / "attention", result.exported).save(sheet)
        return {"picture": str(sheet), "html": str(stage_dir / "attention" / "index.html"), "images": [str(p) for p in images],
                "summary": f"{len(result.exported)} images -> {GALLERY_FILE}"}

    # -- the whole run ----------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        """Run (or resume) every stage, then write ``results.json`` and ``results.md``."""
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self._run_stages()
        except _StopAfter:
            print(f"[bench_quality] stopped after {self.current} (--stop-after): continue with --resume", flush=True)
        except StageError as err:
            self.write_results(failed={"stage": self.current, "error": str(err)})
            raise
        return self.write_results()

    def _run_stages(self) -> None:
        data = self.stage("data", self.data_stage)
        self.images, self.shards = data["images"], data["shards"]
        self.stage("pixels_knn", self.pixels_stage)
        for method in ("dino", "mae"):
            self.stage(f"{method}_pretrain", lambda d, m=method: self.pretrain_stage(m, d))
        for method in ("dino", "mae"):  # the cheap evaluations first, the finetunes last
            pre = self.stages[f"{method}_pretrain"]
            linear = {"n_last_blocks": 1} if self.opts.tiny and method == "dino" else {}  # 1 block
            for prefix, model in (("", {"weights": pre["checkpoint"]}),
                                  ("random_", {"weights": None, "arch": pre["arch"], "backbone_kwargs": pre["backbone_kwargs"]})):
                name = f"{prefix}{method}"
                self.stage(f"{name}_knn", lambda d, n=name, m=method, w=model: self.eval_stage(
                    f"{n}_knn", f"{m}_knn", d, "validate", w))
                self.stage(f"{name}_linear", lambda d, n=name, m=method, w=model: self.eval_stage(
                    f"{n}_linear", f"{m}_linear", d, "fit", {**w, **linear}, self.opts.probe_epochs))
        self.stage("gallery", self.gallery_stage)
        for method in ("dino", "mae"):
            weights = {"weights": self.stages[f"{method}_pretrain"]["checkpoint"]}
            self.stage(f"{method}_finetune", lambda d, m=method, w=weights: self.eval_stage(
                f"{m}_finetune", "finetune", d, "fit", w, self.opts.finetune_epochs))
        self.stage("scratch", self.scratch_stage)

    def scratch_stage(self, stage_dir: Path) -> Dict[str, Any]:
        model = {"backbone_kwargs": TINY_BACKBONE} if self.opts.tiny else {}
        result = self.eval_stage("scratch", "scratch", stage_dir, "fit", model, self.opts.finetune_epochs)
        recipe = self._recipe("scratch")["model"]["init_args"]
        kwargs = {**(recipe.get("backbone_kwargs") or {}), **model.get("backbone_kwargs", {})}
        return {**result, "architecture": report.architecture(recipe.get("arch"), kwargs)}

    def write_results(self, failed: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """``results.json`` and ``results.md`` from the stages done so far."""
        opts = asdict(self.opts)
        opts.update(data=str(self.opts.data), output=str(self.opts.output))
        rows = report.result_rows(self.stages)
        accelerator = "cpu" if self.opts.device == "cpu" else "auto"
        nothing = {"counts": {"train": 0, "test": 0}, "classes": [], "source": str(self.opts.data)}
        data = self.stages.get("data", {}).get("images", nothing)
        results = {
            "command": self.opts.command, "options": opts, "environment": report.environment(accelerator),
            "reduced": self.opts.reduced(), "budget_minutes": self.opts.budget_minutes, "data": data,
            "knn": {"k": KNN_K, "temperature": KNN_T, "metric": "cosine"}, "rows": rows, "targets": report.check_targets(rows),
            "stages": self.stages, "gallery": GALLERY_FILE if "gallery" in self.stages else None, "failed": failed,
            "missing": [name for name in STAGES if name not in self.stages],
        }
        (self.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (self.out / "results.md").write_text(report.markdown(results))
        return results


def run_quality(opts: QualityOptions) -> Dict[str, Any]:
    """Run the benchmark described by ``opts``; returns what ``results.json`` holds."""
    return Bench(opts).run()
