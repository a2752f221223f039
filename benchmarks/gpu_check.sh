#!/usr/bin/env bash
# GPU checks in one prepared script (< 5 minutes on one H100/H200): the kernel benchmark (eager vs torch.compile,
# training and inference img/s at 224 px, batch 128), then a short real `koa train --gpu` run through Ray Train
# on synthetic knees, with --compile, to show the whole path works on CUDA.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]       (default bench_out/gpu; needs the venv: make setup)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_out/gpu}
PY=${PY:-.venv/bin/python}
KOA=${KOA:-.venv/bin/koa}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
timeout 240 "$PY" benchmarks/bench_gpu.py --seconds 6 --out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
"$KOA" synth "$OUT/synth" --n 400 --seed 0 > "$OUT/synth.log" 2>&1
"$KOA" prepare "$OUT/synth" --out "$OUT/prep" > "$OUT/prepare.log" 2>&1
timeout 150 "$KOA" train --data "$OUT/prep" --out "$OUT/runs" --name gpu-check --gpu --workers 1 --epochs 3 \
  --image-size 224 --batch-size 64 --compile --no-mlflow 2>&1 | tee "$OUT/train.log"
