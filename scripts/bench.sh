#!/usr/bin/env bash
# Run every benchmark (lmforge side by side with its baseline) and write BENCHMARKS.md.
#   bash scripts/bench.sh                   (full size; run on an otherwise idle machine)
#   bash scripts/bench.sh --only data,checkpoint --repeats 5
#   bash scripts/bench.sh --tiny --output /tmp/BENCHMARKS.md   (seconds: checks they run)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # the venv's ninja for DeepSpeed's op, as in scripts/test.sh
exec .venv/bin/python bench/run_all.py "$@"
