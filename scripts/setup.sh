#!/usr/bin/env bash
# Creates .venv (once) and installs taesd with every extra, at the versions CI last passed with
# (constraints.txt). torch is pinned: an unpinned torch would pull a multi-GB CUDA build; 2.13.0 is
# the CPU build. Re-running is cheap. TAESD_SETUP_REUSE_VENV=1 takes an existing .venv as it is (the
# end-to-end test of run.sh runs a copy of the checkout on the checkout's own .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.taesd-installed
if [ "${TAESD_SETUP_REUSE_VENV:-0}" != 1 ] && \
   { [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; }; then
  .venv/bin/python -m pip install -q --upgrade pip -c constraints.txt
  .venv/bin/python -m pip install -q "torch==2.13.0" -c constraints.txt
  .venv/bin/python -m pip install -q -e ".[all]" -c constraints.txt
  touch "$stamp"
fi
# Compile the Winograd convolution kernel now rather than on first use (~1 s; skipped with a note
# when there is no C++ compiler: the direct convolution is used then).
.venv/bin/python -W ignore::RuntimeWarning -m taesd.runtime.winograd
.venv/bin/python -W ignore::RuntimeWarning -m taesd.runtime.narrow
.venv/bin/python -W ignore::RuntimeWarning -m taesd.runtime.amx
