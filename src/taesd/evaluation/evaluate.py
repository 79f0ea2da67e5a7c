"""Measure TAESD variants (and optionally their teacher VAE) on a folder of images.

Per image and model: PSNR and SSIM of the round trip against the image, the same with the latents
stored as 8 bits in between (as a latent PNG would), and, given a teacher, the latents' mean squared
error against the teacher's latents (in TAESD's convention). The summary is mean +- std per metric,
laid out like the SD-VAE model card. LPIPS is not computed: it needs network weights that are not
available offline (and are never downloaded).

An image that cannot be measured (unreadable, too small for SSIM, ...) is a ``TaesdError``; given a
``failures`` list, ``evaluate_images`` records it there as ``(file, message)`` and goes on.
``write_results`` writes eval.csv, eval.json and grid.png together or not at all.
"""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from taesd.errors import TaesdError
from taesd.evaluation.metrics import check_ssim_size, psnr, ssim
from taesd.io.files import atomic_path, deferred_renames
from taesd.io.images import crop_to, pad_to_multiple, save_image
from taesd.io.inputs import read_image
from taesd.io.latents import dequantize, quantize

METRICS = [("psnr", "PSNR"), ("ssim", "SSIM"), ("psnr_8bit", "PSNR 8-bit latents"),
           ("ssim_8bit", "SSIM 8-bit latents"), ("latent_mse", "latent MSE vs teacher")]


def measure_image(image: torch.Tensor, model, teacher_latents: torch.Tensor | None
                  ) -> tuple[dict, torch.Tensor]:
    """Numbers for one image (3|4 x H x W) and one TAESD model; also returns its round trip."""
    v = model.variant
    padded, size = pad_to_multiple(image, v.downscale)
    latents = model.encode(padded[None])
    decoded = crop_to(model.decode(latents), size).float().cpu()
    decoded8 = crop_to(model.decode(dequantize(quantize(latents))), size).float().cpu()
    ref = image[None]
    row = {"psnr": psnr(decoded, ref).item(), "ssim": ssim(decoded, ref).item(),
           "psnr_8bit": psnr(decoded8, ref).item(), "ssim_8bit": ssim(decoded8, ref).item()}
    if teacher_latents is not None and teacher_latents.shape == latents.shape:
        row["latent_mse"] = F.mse_loss(latents.float().cpu(), teacher_latents.float().cpu()).item()
    return row, decoded[0]


def measure_teacher(image: torch.Tensor, teacher) -> tuple[dict, torch.Tensor, torch.Tensor]:
    padded, size = pad_to_multiple(image, teacher.downscale)
    latents = teacher.encode(padded[None])
    decoded = crop_to(teacher.decode(latents), size).float().cpu()
    ref = image[None]
    return {"psnr": psnr(decoded, ref).item(), "ssim": ssim(decoded, ref).item()}, latents, decoded[0]


def thumbnail(x: torch.Tensor, size: int) -> torch.Tensor:
    scale = size / max(x.shape[-2:])
    if scale >= 1:
        return x
    h, w = round(x.shape[-2] * scale), round(x.shape[-1] * scale)
    return F.interpolate(x[None], size=(h, w), mode="area")[0]


def evaluate_images(files: list[Path], models: dict, teacher=None, grid_images: int = 4,
                    grid_size: int = 192, progress=None, failures: "list[tuple[Path, str]] | None" = None
                    ) -> tuple[list[dict], torch.Tensor | None]:
    """Rows (file, model, metrics...) for every image x model, and a comparison grid (first images
    as rows; columns: image, teacher, each model). With ``failures``, a failing image is recorded
    there and skipped; without, its TaesdError propagates."""
    rows, grid_rows = [], []
    channels = max(m.variant.image_channels for m in models.values())
    for f in progress(files) if progress else files:
        try:
            image_rows, tiles = _evaluate_one(f, models, teacher, channels)
        except TaesdError as e:
            if failures is None:
                raise TaesdError(str(e) if str(f) in str(e) else f"{f}: {e}") from e
            failures.append((f, str(e)))
            continue
        rows += image_rows
        if len(grid_rows) < grid_images:
            grid_rows.append(torch.cat([thumbnail(t, grid_size) for t in tiles], -1))
    grid = None
    if grid_rows:
        width = max(r.shape[-1] for r in grid_rows)
        grid = torch.cat([F.pad(r, (0, width - r.shape[-1])) for r in grid_rows], -2)
    return rows, grid


def _evaluate_one(f: Path, models: dict, teacher, channels: int) -> tuple[list[dict], list[torch.Tensor]]:
    image, _ = read_image(f, channels)
    check_ssim_size(image)   # before any work
    rows, t_lat, tiles = [], None, [image[:3]]
    if teacher is not None:
        t_row, t_lat, t_dec = measure_teacher(image[:3], teacher)
        rows.append({"file": str(f), "model": f"teacher:{teacher.name}", **t_row})
        tiles.append(t_dec[:3])
    for name, model in models.items():
        row, decoded = measure_image(image[:model.variant.image_channels], model, t_lat)
        rows.append({"file": str(f), "model": name, **row})
        tiles.append(decoded[:3])
    return rows, tiles


RESULT_FILES = ("eval.csv", "eval.json", "grid.png")


def summarize(rows: list[dict]) -> dict:
    """model -> metric -> {"mean", "std", "n"} (population std, as the model card's +-)."""
    out: dict[str, dict] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        out[model] = {}
        for key, _ in METRICS:
            vals = [r[key] for r in mine if key in r and not math.isnan(r[key])]
            if vals:
                out[model][key] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals),
                                   "n": len(vals)}
    return out


def format_table(summary: dict) -> str:
    """Markdown table in the SD-VAE model card's layout: one row per model, mean +- std."""
    keys = [(k, label) for k, label in METRICS if any(k in m for m in summary.values())]
    lines = ["| Model | " + " | ".join(label for _, label in keys) + " |",
             "| --- | " + " | ".join("---" for _ in keys) + " |"]
    for model, m in summary.items():
        cells = []
        for k, _ in keys:
            if k not in m:
                cells.append("-")
            elif k.startswith("ssim"):
                cells.append(f"{m[k]['mean']:.4f} +/- {m[k]['std']:.4f}")
            elif k == "latent_mse":
                cells.append(f"{m[k]['mean']:.4g} +/- {m[k]['std']:.2g}")
            else:
                cells.append(f"{m[k]['mean']:.2f} +/- {m[k]['std']:.2f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: list[dict], summary: dict, grid: torch.Tensor | None, out: "str | os.PathLike",
                  check=None) -> list[Path]:
    """Write eval.csv, eval.json (and grid.png) into ``out``, all or none; ``check(targets)`` may
    refuse them before they appear (see ``taesd.io.files.deferred_renames``)."""
    out = Path(out)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    written = [out / "eval.csv", out / "eval.json"]
    with deferred_renames(check):
        with atomic_path(out / "eval.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(rows)
        with atomic_path(out / "eval.json") as tmp:
            tmp.write_text(json.dumps({"summary": summary, "images": rows}, indent=2) + "\n")
        if grid is not None:
            save_image(grid, out / "grid.png")
            written.append(out / "grid.png")
    return written
