#!/usr/bin/env bash
# Creates .venv with the CPU build of torch (pinned in constraints.txt) and installs OFFSIDE + test deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, from the constraints file: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install -q -c constraints.txt torch
.venv/bin/pip install -q -c constraints.txt -e ".[test]"
# The report test renders report.html in headless Chromium (Debian's package; Playwright drives it).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
    || echo "setup: chromium not installed; the headless report test will be skipped" >&2
fi
