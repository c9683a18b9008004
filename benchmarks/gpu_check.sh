#!/usr/bin/env bash
# GPU figures in one table (RMU engine vs naive two-copy, the prefix path, wmdp eval vs lm-eval)
# on a random-init Mistral-7B-shaped model; nothing is downloaded. See benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh            # one GPU: about 6 min (hard stop at 9.5 min)
#   bash benchmarks/gpu_check.sh --tiny     # the same code on the CPU, a tiny model
#   WMDP_GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   # the same as --tiny
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout --kill-after=10 570 "$PY" benchmarks/gpu_check.py "$@"
