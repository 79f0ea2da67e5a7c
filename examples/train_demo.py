"""The training demonstration of docs/training.md: distil a fresh, small student from taef2 on
scikit-image's photos, CPU only, in about ten minutes.

    PYTHONPATH=src TAESD_WEIGHTS=/path/to/weights python3 examples/train_demo.py --out runs/demo [--docs]

Data: scikit-image's photos at their own resolution (those larger than 512 px downscaled to
512; grey ones as RGB), astronaut held out. Teacher: the published taef2 (its latents are TAESD's
convention already). Student: a fresh custom network (width 48, one block per stage: ~1/4 of
taef2's compute). The decoder is fed taef2's latents and learns taef2's decode (--decoder-target
teacher; `image` is the recipe's real-photo target), MSE plus a small adaptive hinge adversarial
term for the last 300 steps; the encoder learns taef2's latents (MSE). lr 2e-3 with cosine decay
(the recipe's 3e-4 is for long runs). The teacher runs once per photo (--cache-latents); 2 CPU
threads (--threads 1 is faster on a busy CPU). Measured: 22.32 dB in 10 minutes (docs/training.md).

Measured on the whole held-out photo (512 x 512), against the teacher's decode: the student decoder on
the teacher's latents, and the student's own round trip (student encoder -> student decoder). A re-run
starts the run over (--overwrite's behaviour).
--docs copies the learning curve and the first/last sample grids into docs/img/.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from taesd.training.loop import TrainConfig, train

PHOTOS = ["chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right", "immunohistochemistry",
          "hubble_deep_field", "retina", "colorwheel", "camera", "brick", "grass", "gravel", "moon", "coins",
          "clock", "cell", "page"]
HELD_OUT = "astronaut"
METRICS = ("psnr_decoder_vs_teacher", "psnr_roundtrip_vs_teacher", "psnr_roundtrip_vs_image", "latent_mse")


def photo_array(name: str) -> np.ndarray:
    import skimage.data
    if name.startswith("motorcycle_"):   # the stereo pair: two colour photos
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(skimage.data, name)()


def write_photo(name: str, path: Path, longest: int = 512) -> None:
    arr = photo_array(name)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    img = Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    scale = longest / max(img.size)
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    img.save(path)


def docs_strip(grid: Image.Image, tile: int, keep: int = 128) -> Image.Image:
    """The sample grid (rows: photo, teacher, student decoder, student round trip) as one row of
    the centre ``keep`` x ``keep`` of each tile: small enough for the docs, at full detail."""
    rows = grid.height // tile
    strip = Image.new("RGB", (rows * keep, keep))
    off = (tile - keep) // 2
    for r in range(rows):
        strip.paste(grid.crop((off, r * tile + off, off + keep, r * tile + off + keep)), (r * keep, 0))
    return strip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--steps", type=int, default=2800, help="optimizer steps")
    ap.add_argument("--minutes", type=float, default=12.5, help="training time limit (a safety net)")
    ap.add_argument("--width", type=int, default=48, help="student width (taef2: 64)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (1 is faster on a busy CPU)")
    ap.add_argument("--decoder-target", choices=["teacher", "image"], default="teacher",
                    help="what the student decoder learns to produce from taef2's latents: taef2's own "
                         "decode (distillation; what the demo measures) or the real photo (the recipe)")
    ap.add_argument("--docs", action="store_true", help="copy the plot and sample grids to docs/img/")
    args = ap.parse_args()
    out = Path(args.out)
    data, holdout = out / "photos", out / "holdout"
    data.mkdir(parents=True, exist_ok=True)
    holdout.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        write_photo(name, data / f"{name}.png")
    write_photo(HELD_OUT, holdout / f"{HELD_OUT}.png")

    cfg = TrainConfig(
        data=str(data), holdout=[str(holdout)], out=str(out / "run"), teacher="taef2",
        student="custom", width=args.width, depth=1, steps=args.steps, time_limit=args.minutes * 60,
        batch=8, crop=48, lr=2e-3, lr_decay="cosine", ema=0.98, decoder_target=args.decoder_target,
        cache_latents=True, overwrite=True,
        adv_weight=0.05, adv_loss="hinge", adv_start=max(0, args.steps - 300),
        eval_crop=512, eval_every=200, log_every=10, ckpt_every=200,
        cpu=True, threads=args.threads, seed=0)
    t0 = time.time()
    report = train(cfg)
    wall = time.time() - t0

    import csv
    with open(out / "run" / "metrics.csv") as f:
        evals = [r for r in csv.DictReader(f) if r.get("psnr_decoder_vs_teacher")]
    first, last = evals[0], evals[-1]
    summary = {
        "steps": report["step"], "wall_seconds": round(wall, 1), "train_seconds": round(report["seconds"], 1),
        "images_per_s_median": report["images_per_s_median"], "crop": cfg.crop, "batch": cfg.batch,
        "held_out": HELD_OUT,
        **{k: [float(first[k]), report["eval"][k]] for k in METRICS},
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n| hold-out ({HELD_OUT}) vs teacher decode | step 0 | step {last['step']} |")
    print("| --- | --- | --- |")
    for k in METRICS:
        print(f"| {k} | {summary[k][0]:.2f} | {summary[k][1]:.2f} |")
    print(f"steps {report['step']}, {summary['images_per_s_median']} crops/s ({cfg.crop}x{cfg.crop}), "
          f"wall {wall / 60:.1f} min")
    if args.docs:
        img = Path(__file__).resolve().parents[1] / "docs" / "img"
        img.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "run" / "learning_curve.png", img / "train_curve.png")
        samples = sorted((out / "run" / "samples").glob("step_*.png"))
        for src, name in ((samples[0], "train_samples_start.png"), (samples[-1], "train_samples_end.png")):
            docs_strip(Image.open(src), cfg.eval_crop).save(img / name, optimize=True)
        (img.parent / "train_demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["psnr_decoder_vs_teacher"][1] >= 22 else 1


if __name__ == "__main__":
    sys.exit(main())
