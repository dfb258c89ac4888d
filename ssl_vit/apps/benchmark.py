"""``ssl-vit benchmark``: training throughput (one JSON line per run, :mod:`ssl_vit.apps.benchmark_train`),
the CPU input-pipeline benchmark (``--data-only``, :mod:`ssl_vit.apps.benchmark_data`), and the GPU
suite (``--suite gpu``; ``--regenerate-table``, :mod:`ssl_vit.apps.benchmark_suite`).
"""
import argparse
import json
import sys
from dataclasses import fields
from typing import Any, Dict, List, Optional

from ssl_vit.apps import benchmark_data, benchmark_suite
from ssl_vit.apps.benchmark_train import (  # noqa: F401  (the library API, re-exported)
    BenchConfig,
    build_module,
    count_flops_per_image,
    find_max_batch,
    run_benchmark,
    vit_forward_gflop,
)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """One training-throughput row; ``--data-only`` and ``--suite``/``--regenerate-table`` hand over to
    their modules."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--data-only" in argv:
        return benchmark_data.main([a for a in argv if a != "--data-only"])
    if "--suite" in argv or "--regenerate-table" in argv:
        return benchmark_suite.main(argv)
    p = argparse.ArgumentParser(prog="ssl-vit benchmark", description=__doc__.splitlines()[0],
                                epilog="--data-only: the CPU input-pipeline benchmark (see --data-only --help); "
                                       "--suite gpu: the GPU table (see --suite gpu --help)")
    defaults = argparse.Namespace(**{f.name: f.default for f in fields(BenchConfig)})
    p.add_argument("--method", choices=["mae", "dino"], required=True)
    p.add_argument("--arch", default=defaults.arch)
    p.add_argument("--depth", type=int, default=None, help="blocks, overriding the arch's (quick checks)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--warmup", type=int, default=defaults.warmup)
    p.add_argument("--precision", default=None,
                   help="Lightning precision: bf16-mixed, 16-mixed, 32-true (default: bf16-mixed on CUDA, 32-true on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile every block (and DINO's device augmentation)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute the encoder blocks in backward")
    p.add_argument("--gpu-augment", action="store_true",
                   help="DINO with --data SHARDS: crops on CPU, colour/blur/solarise batched on the device")
    p.add_argument("--fast-data", action="store_true",
                   help="with --data SHARDS: the transforms' speed switches (torch_resize, draft, the torchvision JPEG "
                        "decoder; fused_views and uint8_views on the CPU multi-crop)")
    p.add_argument("--sync-debug", action="store_true",
                   help="fail on any host-device synchronisation in the timed steps (CUDA)")
    p.add_argument("--find-max-batch", action="store_true",
                   help="search the largest batch that fits in device memory, from --batch-size up")
    p.add_argument("--append", default=None, help="also append the JSON line to this file")
    p.add_argument("--device", default=defaults.device, choices=["cuda", "cpu"])
    p.add_argument("--data", default="synthetic", help="'synthetic' or a shard pattern (with its JSON beside it)")
    p.add_argument("--workers", type=int, default=defaults.workers)
    p.add_argument("--img-size", type=int, default=defaults.img_size, help="MAE input size")
    p.add_argument("--mask-ratio", type=float, default=defaults.mask_ratio)
    p.add_argument("--global-size", type=int, default=defaults.global_size, help="DINO global crop size")
    p.add_argument("--local-size", type=int, default=defaults.local_size, help="DINO local crop size")
    p.add_argument("--local-crops", type=int, default=defaults.local_crops)
    p.add_argument("--out-dim", type=int, default=defaults.out_dim, help="DINO prototypes K")
    args = p.parse_args(argv)
    append, search = args.__dict__.pop("append"), args.__dict__.pop("find_max_batch")
    try:
        cfg = BenchConfig(**{k: v for k, v in vars(args).items()})
    except ValueError as err:
        p.error(str(err))
    if search and cfg.device != "cuda":
        p.error("--find-max-batch searches device memory: it needs --device cuda")
    result = find_max_batch(cfg) if search else run_benchmark(cfg)
    print(json.dumps(result), flush=True)
    if append:
        with open(append, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result
