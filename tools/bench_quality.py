#!/usr/bin/env python
"""CIFAR-10 representation quality: pretrain DINO and MAE within a time budget, evaluate them
(k-NN, linear probe, finetune) against a supervised baseline, random weights and raw pixels.
The same as `ssl-vit quality` (ssl_vit.apps.quality).

    python tools/bench_quality.py --data ../shared/datasets/cifar10-jpg.tar.gz --output runs/quality
    python tools/bench_quality.py --data ... --output runs/quality --resume   # continue an interrupted run

Writes OUTPUT/results.json, OUTPUT/results.md and OUTPUT/attention_gallery.png (see ssl_vit.apps.quality).
"""
import sys

from ssl_vit.apps.quality import command, main  # noqa: F401 (main: for callers that run this file)

if __name__ == "__main__":
    try:
        sys.exit(command())
    except (OSError, ValueError) as err:
        print(f"bench_quality: error: {err}", file=sys.stderr)
        sys.exit(1)
