#!/usr/bin/env bash
# Install the system packages the test suite needs beyond .venv (Debian's, through apt-get):
#   chromium     the dashboard's browser test drives it through Playwright (Playwright
#                downloads no browser here)
#   postgresql   the shared-MLflow test runs a real PostgreSQL (initdb/pg_ctl, a temp cluster)
# Quiet and safe to run again: it does nothing for what is there. Uses sudo unless root.
#   bash scripts/deps.sh            (LMFORGE_CHROMIUM=/path/to/chromium to use another browser,
#                                    LMFORGE_PG_BIN=/path/to/postgresql/bin another PostgreSQL)
# scripts/test.sh runs it first. When an install fails the tests needing it skip, except under
# CI=true, where this script fails (and so would those tests).
set -euo pipefail
chromium=${LMFORGE_CHROMIUM:-/usr/bin/chromium}

have_postgres() {
  if [[ -n "${LMFORGE_PG_BIN:-}" ]]; then
    [[ -x "$LMFORGE_PG_BIN/initdb" ]]
  else
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null
  fi
}

missing=()
[[ -x "$chromium" ]] || missing+=(chromium)
have_postgres || missing+=(postgresql)
[[ ${#missing[@]} -eq 0 ]] && exit 0

fail() {
  echo "deps: $1; the dashboard's browser test needs Chromium at $chromium, the shared-MLflow" \
    "test PostgreSQL's server" >&2
  [[ "${CI:-}" == "true" ]] && exit 1
  echo "deps: those tests will be skipped (LMFORGE_CHROMIUM / LMFORGE_PG_BIN name others)" >&2
  exit 0
}

command -v apt-get >/dev/null || fail "no apt-get to install Debian's ${missing[*]} with"
sudo=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || fail "not root and no sudo to run apt-get with"
  sudo=(sudo)
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
echo "deps: installing Debian's ${missing[*]} (apt-get) for the browser and shared-MLflow tests"
# Try the package lists there are first; refresh them only when that fails.
if ! "${sudo[@]}" apt-get install -y -q "${missing[@]}" >"$log" 2>&1; then
  if ! { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q "${missing[@]}"; } \
    >"$log" 2>&1; then
    tail -n 5 "$log" >&2
    fail "apt-get install ${missing[*]} failed"
  fi
fi
[[ -x "$chromium" ]] || fail "apt-get installed chromium, but not at $chromium"
have_postgres || fail "apt-get installed postgresql, but no initdb under /usr/lib/postgresql"
