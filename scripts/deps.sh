#!/usr/bin/env bash
# Install the system packages the test suite needs beyond .venv: Debian's Chromium, which the
# dashboard's browser test drives through Playwright (Playwright downloads no browser here).
# Quiet and safe to run again: it does nothing when the browser is there. Uses sudo unless root.
#   bash scripts/deps.sh            (LMFORGE_CHROMIUM=/path/to/chromium to use another browser)
# scripts/test.sh runs it first. When the install fails the browser test skips, except under
# CI=true, where this script fails (and so would the test).
set -euo pipefail
chromium=${LMFORGE_CHROMIUM:-/usr/bin/chromium}
[[ -x "$chromium" ]] && exit 0

fail() {
  echo "deps: $1; the dashboard's browser test needs Chromium at $chromium" >&2
  [[ "${CI:-}" == "true" ]] && exit 1
  echo "deps: it will be skipped (set LMFORGE_CHROMIUM=/path/to/chromium to use another)" >&2
  exit 0
}

command -v apt-get >/dev/null || fail "no apt-get to install Debian's chromium with"
sudo=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || fail "not root and no sudo to run apt-get with"
  sudo=(sudo)
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
echo "deps: installing Debian's chromium (apt-get) for the dashboard's browser test"
# Try the package lists there are first; refresh them only when that fails.
if ! "${sudo[@]}" apt-get install -y -q chromium >"$log" 2>&1; then
  if ! { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q chromium; } \
    >"$log" 2>&1; then
    tail -n 5 "$log" >&2
    fail "apt-get install chromium failed"
  fi
fi
[[ -x "$chromium" ]] || fail "apt-get installed chromium, but not at $chromium"
