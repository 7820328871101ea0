#!/usr/bin/env bash
# On a machine with a CUDA GPU (e.g. the lent H200): CUDA correctness checks, then every benchmark on CUDA.
# Budget: under 5 minutes after `make setup`. Usage: bash benchmarks/gpu_check.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
"$PY" benchmarks/cuda_checks.py
"$PY" benchmarks/run_all.py --device cuda -- --rows 200000 --repeats 3 --schulz-large
