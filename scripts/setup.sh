#!/usr/bin/env bash
# Create .venv at the repo root and install lmforge with every dependency pinned by
# constraints.txt; and .venv-services, the services the tests run (moto's S3 server, the
# MLflow server with PostgreSQL's driver), pinned by constraints-services.txt: apart from
# .venv because botocore needs python-dateutil<3. Safe to run again: each reinstalls only
# when its pins (or pyproject) change.
#   bash scripts/setup.sh            (PYTHON=/path/to/python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3 || true)}
if [[ -z "$PY" ]] || ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: needs Python 3.11 or newer (found: ${PY:-none}); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  echo "setup: creating .venv with $("$PY" --version)"
  rm -rf .venv
  "$PY" -m venv .venv
fi
stamp=.venv/.lmforge-installed
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "setup: installing pinned dependencies into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
fi

svc_stamp=.venv-services/.lmforge-installed
svc_want=$(cat requirements-services.txt constraints-services.txt | sha256sum | cut -d' ' -f1)
if [[ "$(cat "$svc_stamp" 2>/dev/null)" != "$svc_want" ]]; then
  if ! .venv-services/bin/python -m pip --version >/dev/null 2>&1; then
    echo "setup: creating .venv-services with $("$PY" --version)"
    rm -rf .venv-services
    "$PY" -m venv .venv-services
  fi
  echo "setup: installing the services (moto, boto3, MLflow server, psycopg) into .venv-services"
  .venv-services/bin/python -m pip install -q --upgrade pip
  .venv-services/bin/python -m pip install -q -c constraints-services.txt -r requirements-services.txt
  echo "$svc_want" > "$svc_stamp"
fi
