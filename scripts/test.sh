#!/usr/bin/env bash
# Set everything up and run the whole test suite (unit + integration against a real
# local Ray cluster, DeepSpeed engines, `ray job submit` and a real browser). Installs what
# the tests need first: Chromium (scripts/deps.sh, apt) and .venv (scripts/setup.sh).
# Extra args go to pytest.
#   bash scripts/test.sh            bash scripts/test.sh -m unit     (markers: README.md, Development)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
bash scripts/setup.sh
# The venv's tools first (its ninja, with which Ray's workers build DeepSpeed's JIT op,
# lmforge.dist._prefer_own_tools): a system ninja in a test process would judge that build
# stale and rebuild it (30-160 s on 2 cores), and the next worker would rebuild it back.
export PATH="$PWD/.venv/bin:$PATH"
# Two processes (pytest-xdist), the Ray tests grouped (tests/conftest.py's scheduler): one
# worker computes while the other waits on Ray, so the 2 cores stay busy.
exec .venv/bin/python -m pytest -n 2 "$@"
