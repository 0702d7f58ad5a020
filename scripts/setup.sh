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
