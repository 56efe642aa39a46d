#!/usr/bin/env bash
# One-shot check of the GPU path: bare-step ceiling, an end-to-end run on a 224 px synthetic
# jersey set with every hook on, img/s, ratio, per-phase timings, GradScaler skips, finite loss.
# About 5-10 minutes on one GPU. Options: see bench/gpu_check.py (--size, --per-class, --epochs,
# --batch, --workers, --arch, --out; train.py flags after --).
#   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then
    python=.venv/bin/python
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec "$python" bench/gpu_check.py "$@"
