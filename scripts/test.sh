#!/usr/bin/env bash
# Set everything up and run the whole test suite (unit + integration against a real
# local Ray cluster, DeepSpeed engines, `ray job submit` and a real browser). Installs what
# the tests need first: Chromium (scripts/deps.sh, apt) and .venv (scripts/setup.sh).
# Extra args go to pytest.
#   bash scripts/test.sh            bash scripts/test.sh -m "not integration"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
