#!/usr/bin/env bash
# Makes .venv and installs OFFSIDE with its test dependencies (the one install path for dev and CI).
#   bash scripts/setup.sh          the CPU build of torch (pinned in constraints.txt)
#   bash scripts/setup.sh --gpu    the CUDA build of the same torch version; fails unless torch sees a GPU
# Always install with -c constraints.txt: an unpinned `pip install torch` pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=0
for arg in "$@"; do
  case "$arg" in
    --gpu) GPU=1 ;;
    -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup: unknown option '$arg' (valid: --gpu, --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip

if [ "$GPU" = 1 ]; then
  # On Linux x86_64, PyPI's torch wheel is the CUDA build; a CPU build already in .venv is replaced.
  if ! .venv/bin/python -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
    pip uninstall -y -q torch 2>/dev/null || true
    pip install -q -c constraints.txt torch
  fi
  .venv/bin/python -c 'import sys, torch; print(f"setup: torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {torch.cuda.is_available()}"); sys.exit(not torch.cuda.is_available())' \
    || { echo "setup: torch sees no CUDA GPU (a CPU build, or no driver: check nvidia-smi)" >&2; exit 1; }
else
  # The CPU build: torch as installed, a CPU wheel this machine's pip already finds, else PyTorch's CPU index.
  wheels=$(mktemp -d)
  if .venv/bin/python -c 'import torch' 2>/dev/null \
      || pip download -q --no-deps --no-index -c constraints.txt torch -d "$wheels" >/dev/null 2>&1; then
    pip install -q -c constraints.txt torch
  else
    pip install -q -c constraints.txt --extra-index-url https://download.pytorch.org/whl/cpu torch
  fi
  rm -rf "$wheels"
fi
pip install -q -c constraints.txt -e ".[test]"

# The report test renders report.html in headless Chromium (Debian's package; Playwright drives it).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
    || echo "setup: chromium not installed; the headless report test will be skipped" >&2
fi
echo "setup: done. Activate the environment with: source .venv/bin/activate   (or call .venv/bin/offside)"
