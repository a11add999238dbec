#!/usr/bin/env bash
# Run every benchmark (lmforge side by side with its baseline) and write BENCHMARKS.md.
#   bash scripts/bench.sh                   (full size; run on an otherwise idle machine)
#   bash scripts/bench.sh --only data,checkpoint --repeats 5
#   bash scripts/bench.sh --tiny --output /tmp/BENCHMARKS.md   (seconds: checks they run)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python bench/run_all.py "$@"
