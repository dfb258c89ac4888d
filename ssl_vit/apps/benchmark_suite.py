"""The GPU suite (``ssl-vit benchmark --suite gpu --budget-minutes 9``): every row of docs/benchmarks.md's
GPU table in one command that plans itself to finish inside a time budget, then the CIFAR-10 quality
chain (``ssl-vit quality``) on what is left.

Rows run in :data:`GPU_ROWS` order (the most wanted first), in this process, one after the other. Each
row has a planning estimate (model build, FLOP count, compilation, warm-up and its timed steps on one
H100/H200), scaled by how the rows run so far compared with their estimates (between 0.5x and 3x),
and a time cap on its timed steps. A row whose estimate no longer fits the time left for the rows
(the total less the quality reserve) is skipped and reported so; a row that fails (out of
memory, a compile error) is reported with its error, and the suite goes on. Every row, run, skipped
or failed, is one JSON line of ``--out``, after a header line (machine, budget); the quality chain adds
the last line. ``--regenerate-table FILE`` renders docs/benchmarks.md's GPU table from such a file,
between its ``gpu-table`` markers; rows the file does not have read "GPU measurement pending".

``--tiny`` swaps every model for a 2-block ViT-Ti at 32 pixels on 4 images (CPU, fp32): the dry run
of the test suite, which proves the command, the JSONL and the table in seconds.
"""
import argparse
import datetime
import json
import os
import re
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ssl_vit.apps.benchmark_images import write_benchmark_shards
from ssl_vit.apps.benchmark_train import BenchConfig, find_max_batch, run_benchmark
from ssl_vit.apps.quality import command as quality_command

TABLE_START, TABLE_END = "<!-- gpu-table:start -->", "<!-- gpu-table:end -->"
PENDING = "GPU measurement pending"


@dataclass
class Row:
    """One row of the GPU table.

    Attributes:
        id: the row's key in the JSONL.
        title: the table's "run" cell.
        settings: :class:`BenchConfig` fields of the row.
        estimate_s: planning estimate of the whole row on one H100/H200 (compilation included).
        reference: the reference implementation's img/s, MFU and memory (issue #7), or "".
        target: what the row should reach.
        max_batch: search the largest batch instead of timing one.
        shards: read the benchmark JPEG shards (end to end) instead of synthetic batches.
    """

    id: str
    title: str
    settings: Dict[str, Any]
    estimate_s: float
    reference: Sequence[str] = ("", "", "")
    target: str = ""
    max_batch: bool = False
    shards: bool = False


_MAE_B = dict(method="mae", arch="vit_base_patch16", batch_size=256)
_DINO_S = dict(method="dino", arch="vit_small_patch16", batch_size=128, local_crops=10)
# 2048 shard images: 8 batches of 256 (one epoch); the transforms' speed switches on (fused_views and uint8_views
# on the CPU multi-crop)
_E2E = dict(warmup=2, steps=6, workers=16, fast_data=True)
GPU_ROWS: List[Row] = [
    Row("mae-b16-bf16", "MAE ViT-B/16, 224, mask 0.75, norm_pix, bf16", _MAE_B, 25,
        ("3,093", "23%", "14.1 GiB"), "≥ 6,200, ≥ 46% MFU"),
    Row("dino-s16-b128-bf16", "DINO ViT-S/16, 2×224 + 10×96, K = 65,536, bf16", _DINO_S, 25,
        ("621", "9.6%", "23.4 GiB"), "≥ 1,860"),
    Row("mae-b16-bf16-compile", "MAE ViT-B/16, bf16, compiled blocks", {**_MAE_B, "compile": True}, 70,
        ("3,093", "23%", "14.1 GiB"), "≥ 6,200, ≥ 46% MFU"),
    Row("dino-s16-b128-bf16-compile", "DINO ViT-S/16, bf16, compiled blocks", {**_DINO_S, "compile": True}, 70,
        ("621", "9.6%", "23.4 GiB"), "≥ 1,860"),
    Row("dino-s16-b128-shards-gpuaug", "DINO ViT-S/16 from JPEG shards, device augmentation, compiled, fast data",
        {**_DINO_S, **_E2E, "steps": 10, "compile": True, "gpu_augment": True}, 60, target="≥ 90% of synthetic",
        shards=True),
    Row("dino-s16-b128-shards-cpu",
        "DINO ViT-S/16 from JPEG shards, CPU augmentation, fast data (`fused_views`, `uint8_views`)",
        {**_DINO_S, **_E2E, "steps": 10}, 45, target="≥ 90% of synthetic", shards=True),
    Row("mae-b16-shards", "MAE ViT-B/16 from JPEG shards, 16 workers, fast data", {**_MAE_B, **_E2E}, 35,
        target="≥ 90% of synthetic", shards=True),
    Row("mae-b16-fp16", "MAE ViT-B/16, fp16 (no bf16)", {**_MAE_B, "precision": "16-mixed"}, 25,
        ("2,925", "22%", "14.1 GiB")),
    Row("dino-s16-b128-fp16", "DINO ViT-S/16, fp16 (no bf16)", {**_DINO_S, "precision": "16-mixed"}, 25,
        ("621", "9.6%", "23.4 GiB")),
    Row("dino-s16-b64-bf16", "DINO ViT-S/16, batch 64, bf16", {**_DINO_S, "batch_size": 64}, 20,
        ("506", "8%", "12.3 GiB")),
    Row("dino-b16-b64-bf16", "DINO ViT-B/16, batch 64, bf16", {**_DINO_S, "arch": "vit_base_patch16", "batch_size": 64},
        25, ("317", "19%", "23.6 GiB"), "≥ 634"),
    Row("mae-l16-maxbatch", "MAE ViT-L/16, largest batch", dict(method="mae", arch="vit_large_patch16", batch_size=256),
        120, target="reported", max_batch=True),
    Row("mae-l16-maxbatch-ckpt", "MAE ViT-L/16, largest batch, activation checkpointing",
        dict(method="mae", arch="vit_large_patch16", batch_size=512, grad_checkpointing=True), 150,
        target="reported", max_batch=True),
]
ROW_IDS = [r.id for r in GPU_ROWS]
TINY = dict(arch="vit_tiny_patch4_32", depth=2, batch_size=4, img_size=32, global_size=32, local_size=16,
            local_crops=2, out_dim=64, warmup=1, steps=2, workers=0, device="cpu", decoder_depth=1, decoder_dim=64)
TINY_MAX_BATCH = 8  # the CPU dry run's max-batch search stops here (no device memory to run out of)


def row_config(row: Row, tiny: bool, shards: Optional[str], device: str) -> BenchConfig:
    """The :class:`BenchConfig` of ``row`` (``tiny``: the dry run's sizes, CPU, fp32)."""
    settings = {"warmup": 5, "steps": 20, "device": device, **row.settings}
    if tiny:
        settings = {**settings, **TINY, "precision": None, "compile": False}
    if row.shards:
        settings["data"] = shards
    return BenchConfig(**settings)


@dataclass
class Plan:
    """The clock of one suite: the total budget, the quality chain's reserve, the time used so far."""

    budget_s: float
    quality_s: float
    start: float = field(default_factory=time.perf_counter)
    estimated: float = 0.0  # the estimates of the rows run so far
    spent: float = 0.0  # and what they took

    def used(self) -> float:
        return time.perf_counter() - self.start

    def estimate(self, seconds: float) -> float:
        """A row's estimate, scaled by how the rows so far compared with theirs (0.5x to 3x)."""
        ratio = self.spent / self.estimated if self.estimated else 1.0
        return seconds * min(3.0, max(0.5, ratio))

    def record(self, estimate: float, took: float) -> None:
        self.estimated, self.spent = self.estimated + estimate, self.spent + took

    def rows_left(self) -> float:
        """Seconds the rows may still take."""
        return self.budget_s - self.quality_s - self.used()


def run_row(row: Row, cfg: BenchConfig, plan: Plan, base_estimate: float, tiny: bool) -> Dict[str, Any]:
    """Run one row if its estimate fits the time left; its result line (status ok, skipped or failed)."""
    estimate = plan.estimate(base_estimate)
    line: Dict[str, Any] = {"row": row.id, "title": row.title, "estimate_s": round(estimate, 1)}
    left = plan.rows_left()
    if estimate > left:
        return {**line, "status": "skipped", "reason": f"does not fit: estimated {estimate:.0f} s, {max(left, 0):.0f} s left"}
    if row.shards and not cfg.data:
        return {**line, "status": "skipped", "reason": "no benchmark shards (writing them failed)"}
    began = time.perf_counter()
    try:
        cfg = replace(cfg, max_seconds=max(1.0, min(estimate / 3, left / 3)))  # caps the timed steps only
        result = find_max_batch(cfg, limit=TINY_MAX_BATCH if tiny else 8192) if row.max_batch else run_benchmark(cfg)
        line.update(status="ok", **result)
    except Exception as exc:  # one row's failure (OOM, a compile error) is reported; the suite goes on
        line.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500], trace=traceback.format_exc()[-2000:])
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    line["wall_s"] = round(time.perf_counter() - began, 1)
    plan.record(base_estimate, line["wall_s"])
    return line


def run_suite(budget_minutes: float, out: Path, quality_data: Optional[Path], quality_minutes: float,
              tiny: bool = False, rows: Optional[Sequence[str]] = None, log: Callable[[str], None] = print,
              workdir: Optional[Path] = None) -> List[Dict[str, Any]]:
    """Run the suite (see the module docstring); returns the JSONL lines, which are also written to ``out``."""
    device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    plan = Plan(budget_minutes * 60, quality_minutes * 60 if quality_data else 0.0)
    scale = 0.05 if tiny else 1.0  # the dry run's rows take seconds
    chosen = [r for r in GPU_ROWS if rows is None or r.id in rows]
    header = {"suite": "gpu", "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name()
              if device == "cuda" else "cpu", "torch": torch.__version__, "budget_s": plan.budget_s,
              "quality_reserve_s": plan.quality_s, "tiny": tiny, "cpus": os.cpu_count()}
    lines = [header]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f, tempfile.TemporaryDirectory(prefix="ssl_vit_suite_", dir=workdir) as tmp:

        def emit(line: Dict[str, Any]) -> None:
            lines.append(line)
            f.write(json.dumps(line) + "\n")
            f.flush()
            log(json.dumps({k: v for k, v in line.items() if k not in ("settings", "trace")}))

        f.write(json.dumps(header) + "\n")
        shards = None
        if any(r.shards for r in chosen):
            try:
                shards = write_benchmark_shards(Path(tmp), count=64 if tiny else 2048, shard_size=16 if tiny else 256)
            except Exception as exc:  # the synthetic rows still run
                log(f"benchmark shards could not be written: {type(exc).__name__}: {exc}")
        for row in chosen:
            emit(run_row(row, row_config(row, tiny, shards, device), plan, row.estimate_s * scale, tiny))
        if quality_data:
            emit(run_quality_chain(quality_data, Path(tmp) / "quality", plan, tiny))
    return lines


def run_quality_chain(data: Path, output: Path, plan: Plan, tiny: bool) -> Dict[str, Any]:
    """``ssl-vit quality`` on the time left: each method pretrains for about a quarter of it (the
    evaluation stages and the supervised baseline take the rest)."""
    left = plan.budget_s - plan.used()
    line: Dict[str, Any] = {"row": "quality", "title": "CIFAR-10 quality chain on the time left", "left_s": round(left)}
    if left < (5 if tiny else 90):
        return {**line, "status": "skipped", "reason": f"{left:.0f} s left"}
    argv = ["--data", str(data), "--output", str(output), "--budget-minutes", f"{left / 60 / 4:.2f}"]
    if tiny:
        argv += ["--limit-train", "100", "--limit-test", "50", "--tiny", "--epochs", "1", "--probe-epochs", "1",
                 "--finetune-epochs", "1", "--device", "cpu", "--workers", "0", "--batch-size", "50", "--in-process"]
    began = time.perf_counter()
    status = quality_command(argv)
    line.update(status="ok" if status == 0 else "failed", argv=argv, wall_s=round(time.perf_counter() - began, 1))
    results = output / "results.md"
    if results.exists():
        line["results_md"] = results.read_text()
    return line


# -- the table --------------------------------------------------------------------------------------------------
def _cell(value: Any, fmt: str) -> str:
    return fmt.format(value) if value is not None else ""


def table(lines: Sequence[Dict[str, Any]]) -> str:
    """docs/benchmarks.md's GPU table from the suite's lines (rows absent or not run: pending / skipped)."""
    by_id = {line["row"]: line for line in lines if "row" in line}
    head = ("| run | batch | reference img/s | ref. MFU | ref. memory | target | ssl_vit img/s | MFU | memory | "
            "GFLOPs/img, 2 per multiply-add: train step (ViT fwd) | status |")
    out = [head, "|" + "---|" * 11]
    for row in GPU_ROWS:
        line = by_id.get(row.id)
        batch = str(row.settings.get("batch_size", "")) if not row.max_batch else "largest"
        cells = [row.title, batch, *row.reference, row.target]
        if line is None or line.get("status") != "ok":
            why = PENDING if line is None else f"{line['status']}: {line.get('reason', '')}"
            cells += ["", "", "", "", why]
        else:
            batch_note = f" (batch {line['max_batch']})" if "max_batch" in line else ""
            cells[1] = str(line.get("max_batch", cells[1]))
            mem = _cell(line.get("peak_mem_gib"), "{:.1f} GiB")
            flops = f"{line['gflop_per_img']:.1f} ({line.get('vit_forward_gflop', 0):.1f})"
            cells += [f"{line['img_per_s']:,.0f}{batch_note}", _cell(line.get("mfu"), "{:.1%}"), mem, flops,
                      f"measured on {line.get('device', '?')}"]
        out.append("| " + " | ".join(cells) + " |")
    quality = by_id.get("quality")
    if quality is not None:  # what the quality chain reached on the time left, beside its supervised baseline
        out.append(f"\nCIFAR-10 quality chain on the {quality.get('left_s', '?')} s left: {quality['status']}"
                   + (f" ({quality['reason']})" if quality.get("reason") else ""))
        if quality.get("results_md"):
            out.append("\n" + quality["results_md"].strip())
    return "\n".join(out)


def regenerate(jsonl: Path, doc: Path) -> str:
    """Rewrite the GPU table of ``doc`` (between the markers) from ``jsonl``; returns the table.

    Raises:
        ValueError: ``doc`` has no markers, or ``jsonl`` holds a line that is not JSON.
    """
    lines = []
    for number, text in enumerate(jsonl.read_text().splitlines(), 1):
        if text.strip():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{jsonl}:{number}: not a JSON line ({exc})") from exc
    rendered = table(lines)
    header = next((line for line in lines if line.get("suite")), {})
    source = (f"<!-- generated by `ssl-vit benchmark --regenerate-table {jsonl.name}` from a run on "
              f"{header.get('device', '?')}, {header.get('date', '?')} -->")
    text = doc.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{doc} has no {TABLE_START} ... {TABLE_END} markers around the GPU table")
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.S)
    doc.write_text(pattern.sub(lambda _: f"{TABLE_START}\n{source}\n{rendered}\n{TABLE_END}", text, count=1))
    return rendered


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog="ssl-vit benchmark --suite gpu", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["gpu"], help="run the GPU table's rows")
    p.add_argument("--regenerate-table", type=Path, metavar="JSONL", help="rewrite --doc's GPU table from this file")
    p.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"), help="the document holding the table")
    p.add_argument("--budget-minutes", type=float, default=9.0, help="the whole suite, quality chain included (9)")
    p.add_argument("--quality-data", type=Path, default=None, help="CIFAR-10 archive or folder: run the quality chain")
    p.add_argument("--quality-minutes", type=float, default=4.0, help="reserved for the quality chain (default 4)")
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks/gpu_suite.jsonl"), help="the JSONL written")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of: {', '.join(ROW_IDS)}")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU: the dry run of the command")
    args = p.parse_args(argv)
    if args.regenerate_table:
        if not args.regenerate_table.is_file():
            p.error(f"--regenerate-table: no such file {args.regenerate_table}")
        try:
            rendered = regenerate(args.regenerate_table, args.doc)
        except ValueError as err:
            p.error(str(err))
        print(rendered)
        return {"table": rendered}
    if args.suite is None:
        p.error("--suite gpu (run the rows) or --regenerate-table JSONL")
    rows = None if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows or []) - set(ROW_IDS))
    if unknown:
        p.error(f"--rows: unknown {', '.join(unknown)} (known: {', '.join(ROW_IDS)})")
    if args.budget_minutes <= 0 or args.quality_minutes < 0:
        p.error("--budget-minutes must be > 0 and --quality-minutes >= 0")
    if args.quality_data is not None and not args.quality_data.exists():
        p.error(f"--quality-data: no such file or folder {args.quality_data}")
    if not args.tiny and not torch.cuda.is_available():
        p.error("--suite gpu needs CUDA; --tiny runs the dry run on the CPU")
    lines = run_suite(args.budget_minutes, args.out, args.quality_data, args.quality_minutes, args.tiny, rows)
    print(table(lines))
    return {"lines": lines}
