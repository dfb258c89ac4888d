#!/bin/bash
# The GPU check of docs/benchmarks.md in one command, inside 10 minutes: installs the carried wheels
# (.whl/, made here by ../shared/tools/gpu-wheels.sh), runs every row of the GPU table within the
# budget (ssl-vit benchmark --suite gpu), then the CIFAR-10 quality chain on what is left when
# data/cifar10-jpg.tar.gz was carried. Writes $OUT/gpu_suite.jsonl (or runs/benchmarks/ without $OUT)
# and its log; regenerate the table here with
#   python tools/benchmark.py --regenerate-table gpu_suite.jsonl
#
# With the device tool: carry [".whl", "data"], command "bash tools/benchmark_gpu.sh", timeout_s 600.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-runs/benchmarks}"
mkdir -p "$OUTDIR"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "benchmark_gpu.sh: installing the carried wheels (.whl/) failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
QUALITY=()
[[ -f data/cifar10-jpg.tar.gz ]] && QUALITY=(--quality-data data/cifar10-jpg.tar.gz)
python3 tools/benchmark.py --suite gpu --budget-minutes "${BUDGET_MINUTES:-9}" "${QUALITY[@]}" \
    --out "$OUTDIR/gpu_suite.jsonl" 2>&1 | tee "$OUTDIR/gpu_suite.log"
