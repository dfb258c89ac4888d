#!/usr/bin/env python
"""Training throughput of MAE or DINO: prints one JSON line (img_per_s, step_ms, peak_mem_gib,
gflop_per_img, mfu, settings). See ssl_vit/apps/benchmark.py and docs/benchmarks.md.

    python tools/benchmark.py --method mae --arch vit_base_patch16 --batch-size 256 --steps 50
"""
from ssl_vit.apps.benchmark import main

if __name__ == "__main__":
    main()
