#!/usr/bin/env bash
# Creates .venv (once) and installs taesd with every extra. torch is pinned: an unpinned torch
# would pull a multi-GB CUDA build; 2.13.0 is the CPU build. Re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.taesd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[all]"
  touch "$stamp"
fi
# Compile the Winograd convolution kernel now rather than on first use (~1 s; skipped with a note
# when there is no C++ compiler: the direct convolution is used then).
.venv/bin/python -m taesd.runtime.winograd
