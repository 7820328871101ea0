#!/usr/bin/env bash
# On a machine with a CUDA GPU (e.g. the lent H100 / H200): CUDA correctness checks, the GPU-readiness figures of
# issue 20 item 4 (SmolLM2 and a synthetic 4096-wide layer in fp32 / bf16), then every benchmark on CUDA.
# Budget: under 8 minutes after `make setup` (the new figures take about 2 of them, and come first so a cut-short
# run still leaves them). JSON lands in benchmarks/results/gpu/. Usage: bash benchmarks/gpu_check.sh [PYTHON]
# CPU smoke run of the Python pieces (not figures): .venv/bin/python benchmarks/bench_gpu.py --device cpu --quick
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
"$PY" benchmarks/cuda_checks.py
# SmolLM2 gradient pass vs a plain training step on the same batch (goal <= 1.10x), base weights fp32 and bf16
for precision in float32 bfloat16; do
  timeout 240 "$PY" benchmarks/bench_gradients.py --model smollm2 --device cuda --precision "$precision" \
    --batch 32 --seq 64 --repeats 5 --out "$OUT/gradients_smollm2_cuda_${precision}.json"
done
# SmolLM2 gradient pass + warm-up in fp32 and bf16 (examples/s, peak memory, auto batch), the 4096-wide layer
timeout 300 "$PY" benchmarks/bench_gpu.py --device cuda --out "$OUT/bench_gpu.json"
"$PY" benchmarks/run_all.py --device cuda -- --rows 200000 --repeats 3 --schulz-large
