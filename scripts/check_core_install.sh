#!/usr/bin/env bash
# The core install, as a user without extras gets it: a fresh venv with torch and `pip install .`
# (constraints.txt: the tested versions), no extras. Checks that no optional package came along,
# then, outside the checkout (the installed package, not src/): a Python and a CLI round trip of a
# photo, every command's --help, and the one-line error of an optional feature.
# Usage: bash scripts/check_core_install.sh PHOTO   (needs weights: $TAESD_WEIGHTS, or the network)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
photo=$(realpath "$1")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
"$PY" -m venv "$work/venv"
# --no-compile: no .pyc for torch's thousands of files at install time (they are made on first import)
pip=("$work/venv/bin/python" -m pip install -q --no-compile -c constraints.txt)
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" .
echo "core install: $(( $(date +%s) - start )) s"
cd "$work"
# One process (each start imports torch): no optional package, a Python round trip, every --help.
venv/bin/python - "$photo" <<'PY'
import contextlib, importlib.util, io, sys
optional = ["onnx", "onnxruntime", "onnxscript", "diffusers", "transformers", "accelerate", "tensorboard",
            "matplotlib", "skimage", "psutil", "pytest"]
present = [m for m in optional if importlib.util.find_spec(m)]
assert not present, f"the core install pulled in optional packages: {present}"
import shutil
import taesd
from taesd.cli import COMMANDS, main
from taesd.runtime import amx, isa, narrow, winograd
# The installed package carries its kernels' sources: each one this CPU runs builds and loads.
if shutil.which("c++") or shutil.which("g++"):
    assert winograd.available(), f"the Winograd kernel did not build from the installed package: {winograd.load_error()}"
    assert narrow.available(), f"the narrow conv kernel did not build from the installed package: {narrow.load_error()}"
    if isa.detect().amx:
        assert amx.available(), f"the AMX kernel did not build from the installed package: {amx.load_error()}"
print(f"kernels: Winograd {winograd.available()}, narrow conv {narrow.available()}, AMX {amx.available()} ({isa.detect().level})")
model = taesd.load("taef2")
image = taesd.load_image(sys.argv[1])
padded, size = taesd.pad_to_multiple(image, model.variant.downscale)
latents = model.encode(padded[None])
decoded = model.decode(latents)[..., :size[0], :size[1]]
taesd.save_image(decoded[0], "decoded.png")
mse = float(((decoded[0] - image) ** 2).mean())
assert mse < 0.01, mse
print(f"python round trip: {tuple(image.shape)} -> {tuple(latents.shape)} -> mse {mse:.5f}")
for cmd in [None, *COMMANDS]:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            main([cmd, "--help"] if cmd else ["--help"])
    except SystemExit as e:
        assert e.code == 0, f"taesd {cmd} --help exited {e.code}"
    assert "example" in out.getvalue(), f"taesd {cmd} --help has no example"
print(f"--help of taesd and its {len(COMMANDS)} commands OK")
PY
# The installed entry point: a CLI round trip (encode + decode + PSNR/SSIM)
venv/bin/taesd roundtrip "$photo" --variant taef2 -o roundtrip/
ls roundtrip/ | grep -q png
set +e
venv/bin/taesd export onnx --variant taef2 -o onnx/ 2> err.txt
rc=$?
set -e
if [ "$rc" != 2 ] || [ "$(grep -c -i error err.txt)" != 1 ] || ! tail -1 err.txt | grep -q "pip install 'taesd\[onnx\]'"; then
  echo "an optional feature without its extra should fail with one line naming the extra (rc $rc):"; cat err.txt; exit 1
fi
echo "core install OK in $(( $(date +%s) - start )) s: $(tail -1 err.txt)"
