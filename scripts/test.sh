#!/usr/bin/env bash
# Set everything up and run the whole test suite (unit + integration against a real
# local Ray cluster, DeepSpeed engines and `ray job submit`). Extra args go to pytest.
#   bash scripts/test.sh            bash scripts/test.sh -m "not integration"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
