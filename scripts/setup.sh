#!/usr/bin/env bash
# Creates .venv with the CPU build of torch (pinned in constraints.txt) and installs OFFSIDE + test deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, from the constraints file: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install -q -c constraints.txt torch
# deepspeed is an sdist that needs torch importable at build time.
.venv/bin/pip install -q -c constraints.txt --no-build-isolation deepspeed
.venv/bin/pip install -q -c constraints.txt -e ".[test]"
