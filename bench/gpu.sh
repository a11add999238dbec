#!/usr/bin/env bash
# lmforge's model + DeepSpeed engine against a plain PyTorch loop on one GPU (bench/gpu_train.py),
# on a bare machine with Python 3.12 and PyTorch (CUDA) and no package registry.
#   here:     bash bench/gpu-wheels.sh          (the wheels, into .whl/)
#   there:    bash bench/gpu.sh [gpu_train.py arguments, e.g. --zero 2 --micro-batch 16]
# It installs the carried wheels with --no-index into a private folder (nothing of the
# machine's Python is changed) and runs with lmforge from platform/ (no install).
# Copy the repository with its .whl/ folder to the GPU machine and run it there.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/lmforge-gpu-site}
PY=${PYTHON:-python3}
if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "bench/gpu.sh: no wheels in $WHEELS/; run bash bench/gpu-wheels.sh where a registry is reachable" >&2
  exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PY" bench/gpu_train.py "$@"
