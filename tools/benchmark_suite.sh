#!/bin/bash
# Every row of docs/benchmarks.md on one GPU, appended as JSON lines to $1 (default
# runs/benchmarks.jsonl). Each reference setting is measured plain (bf16 autocast, fused attention,
# fused AdamW, foreach EMA: the defaults) and with compiled blocks. End-to-end rows need
# SHARDS (JPEG shards of ImageNet-sized images, with their JSON) and use 16 loader workers.
#
#   bash tools/benchmark_suite.sh runs/benchmarks.jsonl
#   SHARDS="/data/shards/train-{000000..000063}.tar" bash tools/benchmark_suite.sh runs/benchmarks.jsonl
set -euo pipefail
OUT="${1:-runs/benchmarks.jsonl}"
PY="${PYTHON:-python}"
mkdir -p "$(dirname "$OUT")"
bench() { "$PY" tools/benchmark.py --device cuda --steps 30 --warmup 10 --append "$OUT" "$@"; }

for compile in "" "--compile"; do
    bench --method mae --arch vit_base_patch16 --batch-size 256 $compile
    bench --method mae --arch vit_base_patch16 --batch-size 256 --precision 16-mixed $compile
    bench --method dino --arch vit_small_patch16 --batch-size 64 $compile
    bench --method dino --arch vit_small_patch16 --batch-size 128 $compile
    bench --method dino --arch vit_base_patch16 --batch-size 64 $compile
done
bench --method mae --arch vit_base_patch16 --batch-size 256 --compile --sync-debug   # fails on any host sync
bench --method dino --arch vit_small_patch16 --batch-size 128 --compile --sync-debug
# the largest MAE ViT-L/16 batch that fits, without and with activation checkpointing
bench --method mae --arch vit_large_patch16 --batch-size 128 --compile --find-max-batch
bench --method mae --arch vit_large_patch16 --batch-size 128 --compile --grad-checkpointing --find-max-batch

if [[ -n "${SHARDS:-}" ]]; then  # end to end: JPEG shards through the DataModule and augmentations
    bench --method mae --arch vit_base_patch16 --batch-size 256 --compile --data "$SHARDS" --workers 16
    bench --method dino --arch vit_small_patch16 --batch-size 128 --compile --data "$SHARDS" --workers 16
    bench --method dino --arch vit_small_patch16 --batch-size 128 --compile --data "$SHARDS" --workers 16 --gpu-augment
fi
