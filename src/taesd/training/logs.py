"""What a run writes for people to read: metrics.csv, tensorboard/, sample grids, the learning curve.

Every file is written atomically (a reader never sees half a CSV or PNG). TensorBoard and matplotlib
are optional: without them the run writes everything else.
"""
from __future__ import annotations

import contextlib
import csv
from pathlib import Path

import torch

from taesd.io.files import atomic_path
from taesd.io.images import save_image

EVAL_KEYS = ("psnr", "latent_mse")  # metric names that come from the hold-out evaluation


class CsvLog:
    """Append rows to a CSV whose columns may grow (the file is rewritten atomically)."""

    def __init__(self, path: Path, keep: bool):
        self.path = path
        self.rows: list[dict] = []
        if keep and path.is_file():
            with open(path) as f:
                self.rows = list(csv.DictReader(f))

    def drop_after(self, step: int) -> None:  # a resumed run redoes the steps after its checkpoint
        self.rows = [r for r in self.rows if int(r["step"]) <= step]

    def add(self, row: dict) -> None:
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(self.rows)


class Tensorboard:
    """Scalars under ``eval/`` (hold-out metrics) or ``train/``; does nothing without tensorboard."""

    def __init__(self, folder: Path | None, purge_step: int | None):
        self.writer = None
        if folder is not None:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def add(self, row: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in row.items():
            if k != "step":
                self.writer.add_scalar(("eval/" if k.startswith(EVAL_KEYS) else "train/") + k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """One row per kind (image, teacher, student decoder, student round trip), one column per image."""
    grid = torch.cat([torch.cat(list(r.float().cpu()), -1) for r in rows], -2)
    save_image(grid, path)


def plot_curve(csv_path: Path, png_path: Path) -> None:
    """The hold-out PSNRs of metrics.csv against the step (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key, label in [("psnr_decoder_vs_teacher", "student decoder (teacher latents)"),
                       ("psnr_roundtrip_vs_teacher", "student round trip")]:
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("hold-out PSNR vs teacher decode (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
