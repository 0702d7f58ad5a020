#!/usr/bin/env bash
# Creates .venv (once) and installs Cumulo into it with the exact torch it needs; re-running is cheap.
# Usage: scripts/setup.sh [test]   ("test" adds the test-only dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "cumulo setup: creating .venv with $($PY --version)" >&2
  $PY -m venv .venv
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
stamp=".venv/.installed${extra}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "cumulo setup: installing torch==2.13.0 (CPU) and cumulo${extra}" >&2
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch first and pinned, so nothing else can pull a CUDA build.
  # (grep drops pip's noise about this machine's local index mirrors)
  .venv/bin/pip install -q "torch==2.13.0" 2>&1 | { grep -v "^WARNING: Location" || true; } >&2
  .venv/bin/pip install -q -e ".${extra}" 2>&1 | { grep -v "^WARNING: Location" || true; } >&2
  touch "$stamp"
fi
# The web console's two browser libraries, from the npm registry (console/package-lock.json), copied into the
# package's static/vendor/ (git-ignored); nothing is loaded from a CDN at run time.
vendor=cumulo/service/console/static/vendor
if [ ! -f "$vendor/.installed" ] || [ console/package-lock.json -nt "$vendor/.installed" ]; then
  if ! command -v npm >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "cumulo setup: installing npm (apt) for the web console's packages" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
  fi
  if ! command -v npm >/dev/null; then
    echo "cumulo setup: npm is missing; install Node.js (Debian: apt-get install -y npm) for the web console" >&2
    exit 1
  fi
  echo "cumulo setup: installing the console's npm packages (console/)" >&2
  (cd console && npm ci --silent --no-audit --no-fund --ignore-scripts >/dev/null)
  mkdir -p "$vendor"
  cp console/node_modules/htm/preact/standalone.module.js "$vendor/preact-htm.js"
  cp console/node_modules/chart.js/dist/chart.umd.js "$vendor/chart.umd.js"
  touch "$vendor/.installed"
fi
# The console's browser tests drive Debian's chromium (never a browser downloaded by playwright).
if [ "${1:-}" = "test" ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "cumulo setup: installing chromium (apt) for the console's browser tests" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "cumulo setup: /usr/bin/chromium is missing; install it (apt-get install chromium) for tests/console" >&2
  fi
fi
