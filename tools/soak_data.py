#!/usr/bin/env python
"""Memory soak of the shard pipeline: many epochs of a ShardDataModule through DataLoader workers,
with the resident memory of the main process and of its workers measured every epoch.

    nice -n 10 python tools/soak_data.py                        # 50 epochs of synthetic smoke data
    python tools/soak_data.py --shards 'data/train-{000000..000009}.tar' --transform pretrain --size 224

Without ``--shards`` it writes ``--samples`` random ``--image-size`` images as shards (``write_shards``)
into a temporary directory. Memory is read from ``/proc`` (Linux): the RSS of the main process and
of its children (the workers; summed, so pages they share are counted once per process) and their
PSS (shared pages split between the processes sharing them), sampled ``--samples-per-epoch`` times
during each epoch (the epoch's maximum is kept), and the main process's RSS after the epoch, when the
(non-persistent) workers have exited. One line per epoch goes to stderr; at the end one JSON line goes
to stdout with, for each series, the first, last and maximum epoch values and the growth (last -
first), in MiB.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
from PIL import Image

from ssl_vit.data import PretrainTransform, ShardDataModule, write_shards
from ssl_vit.data.gpu_augment import MultiCropCrops
from ssl_vit.data.multicrop import MultiCropTransform

MIB = 1024.0  # /proc reports kiB


def _proc_kib(path: str, field: str) -> Optional[int]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:  # the process has exited, or smaps_rollup is not available
        return None
    return None


def children(pid: int) -> List[int]:
    """Live pids whose parent is ``pid``, except torch's shared-memory manager (the ``file_system``
    sharing strategy starts one; it is not a DataLoader worker)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    name, rest = f.read().split(" (", 1)[1].rsplit(")", 1)
            except (OSError, IndexError, ValueError):
                continue
            state, parent = rest.split()[:2]
            if int(parent) == pid and state != "Z" and not name.startswith("torch_shm"):  # Z: exited
                found.append(int(entry))
    return found


def memory(pid: int, exclude: Iterable[int] = ()) -> Dict[str, float]:
    """MiB: ``main_rss``, ``workers_rss`` (children summed), ``total_rss``, ``total_pss`` and ``workers``;
    children in ``exclude`` (those that existed before the loader started) are not counted."""
    main = _proc_kib(f"/proc/{pid}/status", "VmRSS") or 0
    skip = set(exclude)
    kids = [c for c in children(pid) if c not in skip]
    worker_rss = sum(_proc_kib(f"/proc/{c}/status", "VmRSS") or 0 for c in kids)
    pss = sum(_proc_kib(f"/proc/{p}/smaps_rollup", "Pss") or 0 for p in [pid, *kids])
    return {"main_rss": main / MIB, "workers_rss": worker_rss / MIB, "total_rss": (main + worker_rss) / MIB,
            "total_pss": pss / MIB, "workers": float(len(kids))}


def synthetic_shards(directory: Path, samples: int, image_size: int, shard_size: int) -> str:
    """``samples`` random RGB images in 10 classes, written as shards; returns the shard pattern."""
    rng = np.random.default_rng(0)
    for i in range(samples):
        folder = directory / "images" / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    info = write_shards(directory / "images", directory / "shards", "train", shard_size, progress=False)
    return str(directory / "shards" / f"train-{{000000..{len(info['shards']) - 1:06d}}}.tar")


def summary(values: List[float]) -> Dict[str, float]:
    return {"first": round(values[0], 1), "last": round(values[-1], 1), "max": round(max(values), 1),
            "growth": round(values[-1] - values[0], 1)}


def make_transform(args: argparse.Namespace) -> Any:
    """The ``--transform`` with the speed switches (ValueError for a combination it refuses)."""
    switches = dict(torch_resize=args.torch_resize, draft=args.draft, jpeg_decoder=args.jpeg_decoder)
    for switch in ("fused_views", "uint8_views"):  # the full CPU multi-crop's own switches
        if getattr(args, switch):
            if args.transform != "multicrop":
                flag = "--" + switch.replace("_", "-")
                raise ValueError(f"{flag} is a switch of the multicrop transform, not of {args.transform}")
            switches[switch] = True
    if args.transform in ("multicrop", "crops"):
        crops = MultiCropCrops if args.transform == "crops" else MultiCropTransform
        return crops(global_size=args.size, local_size=args.size // 2, num_local=args.num_local, **switches)
    return PretrainTransform(args.size, **switches)


def soak(shards: str, args: argparse.Namespace) -> Dict:
    transform = make_transform(args)
    dm = ShardDataModule(shards, batch_size=args.batch_size, num_workers=args.workers, train_transform=transform,
                         pin_memory=False, seed=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = len(loader)
    marks = {round(k * (batches - 1) / max(1, args.samples_per_epoch - 1)) for k in range(args.samples_per_epoch)}
    pid, start = os.getpid(), time.perf_counter()
    others = children(pid)  # not DataLoader workers (e.g. subprocesses of the caller)
    series: Dict[str, List[float]] = {"total_rss": [], "total_pss": [], "main_rss_after_epoch": []}
    workers_seen = 0
    for epoch in range(args.epochs):
        dm.set_epoch(epoch)
        began, peak = time.perf_counter(), None
        for index, _ in enumerate(loader):
            if index in marks:
                now = memory(pid, others)
                workers_seen = max(workers_seen, int(now["workers"]))
                peak = now if peak is None or now["total_rss"] > peak["total_rss"] else peak
        after = memory(pid, others)["main_rss"]
        series["total_rss"].append(peak["total_rss"])
        series["total_pss"].append(peak["total_pss"])
        series["main_rss_after_epoch"].append(after)
        print(
            f"epoch {epoch}: rss {peak['total_rss']:.1f} MiB (main {peak['main_rss']:.1f} + "
            f"{int(peak['workers'])} workers {peak['workers_rss']:.1f}), pss {peak['total_pss']:.1f} MiB, "
            f"main after epoch {after:.1f} MiB, {time.perf_counter() - began:.1f} s",
            file=sys.stderr, flush=True,
        )
        if args.max_seconds and time.perf_counter() - start > args.max_seconds:
            break
    return {
        "epochs": len(series["total_rss"]),
        "workers": workers_seen,
        "batches_per_epoch": batches,
        "samples_per_epoch": batches * args.batch_size,
        "transform": args.transform,
        "switches": {"torch_resize": args.torch_resize, "draft": args.draft, "jpeg_decoder": args.jpeg_decoder,
                     "fused_views": args.fused_views, "uint8_views": args.uint8_views},
        "seconds": round(time.perf_counter() - start, 1),
        "total_rss_mib": summary(series["total_rss"]),
        "total_pss_mib": summary(series["total_pss"]),
        "main_rss_after_epoch_mib": summary(series["main_rss_after_epoch"]),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=None, help="shard pattern; default: synthetic shards in a temporary directory")
    parser.add_argument("--samples", type=int, default=512, help="synthetic images (default 512)")
    parser.add_argument("--image-size", type=int, default=32, help="synthetic image side (default 32)")
    parser.add_argument("--shard-size", type=int, default=64, help="synthetic samples per shard (default 64)")
    parser.add_argument("--epochs", type=int, default=50, help="epochs (default 50)")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop after the epoch that passes this time")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers (default 4)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--transform", choices=["multicrop", "crops", "pretrain"], default="multicrop",
                        help="MultiCropTransform, MultiCropCrops (crops only) or PretrainTransform")
    parser.add_argument("--size", type=int, default=32, help="output side (multicrop: global; local is half) (default 32)")
    parser.add_argument("--num-local", type=int, default=2, help="multicrop local crops (default 2)")
    parser.add_argument("--samples-per-epoch", type=int, default=4, help="memory samples per epoch (default 4)")
    parser.add_argument("--torch-resize", action="store_true", help="the transform's torch_resize speed switch")
    parser.add_argument("--draft", action="store_true", help="the transform's draft speed switch (JPEG DCT scaling)")
    parser.add_argument("--jpeg-decoder", choices=["pil", "torchvision"], default="pil",
                        help="the transform's jpeg_decoder switch (torchvision needs --torch-resize) (default pil)")
    parser.add_argument("--fused-views", action="store_true",
                        help="multicrop's fused_views switch (needs --torch-resize)")
    parser.add_argument("--uint8-views", action="store_true",
                        help="multicrop's uint8_views switch (needs --fused-views): views collated as uint8")
    args = parser.parse_args(argv)
    if not Path("/proc/self/status").exists():
        parser.error("reads memory from /proc: Linux only")
    for name in ("samples", "image_size", "shard_size", "epochs", "batch_size", "size", "samples_per_epoch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        make_transform(args)
    except ValueError as err:
        parser.error(str(err))
    if args.shards is not None:
        result = soak(args.shards, args)
    else:
        with tempfile.TemporaryDirectory(prefix="soak_data_") as tmp:
            result = soak(synthetic_shards(Path(tmp), args.samples, args.image_size, args.shard_size), args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
