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
pip=("$work/venv/bin/python" -m pip install -q -c constraints.txt)
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" .
echo "core install: $(( $(date +%s) - start )) s"
cd "$work"
venv/bin/python - <<'PY'
import importlib.util
optional = ["onnx", "onnxruntime", "onnxscript", "diffusers", "transformers", "accelerate", "tensorboard",
            "matplotlib", "skimage", "psutil", "pytest"]
present = [m for m in optional if importlib.util.find_spec(m)]
assert not present, f"the core install pulled in optional packages: {present}"
PY
venv/bin/python - "$photo" <<'PY'
import sys, taesd
model = taesd.load("taef2")
image = taesd.load_image(sys.argv[1])
padded, size = taesd.pad_to_multiple(image, model.variant.downscale)
latents = model.encode(padded[None])
decoded = model.decode(latents)[..., :size[0], :size[1]]
taesd.save_latents("photo.taef2.safetensors", latents[0], "taef2", size)
taesd.save_image(decoded[0], "decoded.png")
mse = float(((decoded[0] - image) ** 2).mean())
assert mse < 0.01, mse
print(f"python round trip: {tuple(image.shape)} -> {tuple(latents.shape)} -> mse {mse:.5f}")
PY
venv/bin/taesd roundtrip "$photo" --variant taef2 -o roundtrip/
venv/bin/taesd decode photo.taef2.safetensors -o decoded-cli.png
test -s decoded-cli.png && ls roundtrip/ | grep -q png
venv/bin/taesd --help | grep -q "examples:"   # the installed entry point
venv/bin/python - <<'PY'
import contextlib, io
from taesd.cli import COMMANDS, main
for cmd in COMMANDS:   # every command's --help, in one process (each taesd start imports torch)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            main([cmd, "--help"])
    except SystemExit as e:
        assert e.code == 0, f"taesd {cmd} --help exited {e.code}"
    assert "example" in out.getvalue(), f"taesd {cmd} --help has no example"
print(f"--help of {len(COMMANDS)} commands OK")
PY
set +e
venv/bin/taesd export onnx --variant taef2 -o onnx/ 2> err.txt
rc=$?
set -e
if [ "$rc" != 2 ] || [ "$(grep -c -i error err.txt)" != 1 ] || ! tail -1 err.txt | grep -q "pip install 'taesd\[onnx\]'"; then
  echo "an optional feature without its extra should fail with one line naming the extra (rc $rc):"; cat err.txt; exit 1
fi
echo "core install OK in $(( $(date +%s) - start )) s: $(tail -1 err.txt)"
