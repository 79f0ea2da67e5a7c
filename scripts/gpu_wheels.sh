#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has no network): diffusers and its one missing dependency,
# for its Python 3.12 x86-64, into .whl/ (git-ignored). benchmarks/gpu_check.sh installs them there.
#   bash scripts/gpu_wheels.sh        # then carry .whl in the device run
# The image has torch, triton, transformers, huggingface_hub, safetensors, regex, requests, Pillow,
# numpy, filelock, zipp, scikit-image, pytest (/work/.library/device/KINDS.md); not diffusers.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "diffusers==0.42.1" "importlib_metadata==10.2.0"
ls -la .whl
du -sh .whl
