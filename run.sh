#!/usr/bin/env bash
# The main job: set up, then round-trip scikit-image's photos through TAESD (taef2 by default):
# the decoded images go to out/roundtrip/ (exact latents) and out/roundtrip-8bit/ (8-bit latents),
# the PSNR/SSIM lines to out/report.txt. Any arguments are passed to the `taesd` CLI instead, e.g.
# `bash run.sh roundtrip my.jpg --variant taesdxl`.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
if [ $# -gt 0 ]; then
  exec .venv/bin/taesd "$@"
fi
VARIANT=${VARIANT:-taef2}
mkdir -p out/photos
.venv/bin/python - <<'PY'
from pathlib import Path
from PIL import Image
import skimage.data as data
for name in ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left"]:
    Image.fromarray(getattr(data, name)() if name != "motorcycle_left" else data.stereo_motorcycle()[0]).save(Path("out/photos") / f"{name}.png")
PY
{
  echo "# exact latents ($VARIANT)"
  .venv/bin/taesd roundtrip out/photos --variant "$VARIANT" -o out/roundtrip --overwrite
  echo "# 8-bit latents, as a latent PNG stores them ($VARIANT)"
  .venv/bin/taesd roundtrip out/photos --variant "$VARIANT" --latents png -o out/roundtrip-8bit --overwrite
} | tee out/report.txt
echo "report: out/report.txt"
