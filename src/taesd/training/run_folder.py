"""A training run's folder: what taesd writes there, the marker that says taesd made it, and
``--overwrite``, which removes only what taesd wrote.

- ``.taesd-run``: written when taesd creates or takes over the folder. A folder that holds run files
  (``checkpoint.pt``, ``metrics.csv``, ``report.json``) but no marker was not made by this taesd:
  ``--overwrite`` refuses it rather than guess.
- ``--overwrite`` removes, in a marked folder, only the files taesd writes, by name (and, for
  safetensors, by taesd's metadata): the top-level run files, ``samples/step_NNNNNN.png``,
  ``tensorboard/events.out.tfevents.*``, and the student's weight files. Anything else (a user's
  notes in ``samples/``, their own weights in ``student/``) stays; a folder left empty is removed.
  The latent cache is kept: each shard says what it was made from and is rebuilt when that differs.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from taesd.errors import TaesdError
from taesd.io.naming import has_taesd_marker
from taesd.registry import PARTS, VARIANTS
from taesd.training.checkpoint import CHECKPOINT

MARKER = ".taesd-run"
RUN_FILES = (CHECKPOINT, "metrics.csv", "report.json")   # a folder with one of these holds a run
TOP_OUTPUTS = (*RUN_FILES, "learning_curve.png")
_VARIANT = "|".join(sorted(map(re.escape, VARIANTS), key=len, reverse=True))
_PART = "|".join(PARTS)
# folder -> the names taesd writes in it (relative to that folder)
_OWN_NAMES = {
    "samples": re.compile(r"step_\d{6,}\.png"),
    "tensorboard": re.compile(r"events\.out\.tfevents\.[^/]+"),
    "student": re.compile(rf"(({_VARIANT})_({_PART})\.(pth|safetensors)|({_VARIANT})\.safetensors"
                          rf"|student\.safetensors|diffusers/config\.json"
                          rf"|diffusers/diffusion_pytorch_model\.safetensors)"),
}


def held_run_files(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()]


def check_overwritable(out: Path) -> None:
    """Refuse ``--overwrite`` on a folder that holds run files taesd cannot vouch for (no marker)."""
    held = held_run_files(out)
    if held and not (out / MARKER).is_file():
        raise TaesdError(f"{out} holds {', '.join(held)} but no {MARKER} marker, so taesd did not make "
                         f"it (or an older taesd did); --overwrite clears only taesd's own runs: remove "
                         f"those files yourself or choose another --out")


def is_own_output(out: Path, path: Path) -> bool:
    """Whether ``path`` (inside the run folder ``out``) is a file taesd's training writes."""
    rel = path.relative_to(out).as_posix()
    if "/" not in rel:
        return rel in TOP_OUTPUTS
    folder, rest = rel.split("/", 1)
    pattern = _OWN_NAMES.get(folder)
    if pattern is None or not pattern.fullmatch(rest):
        return False
    if path.suffix == ".safetensors" and "diffusers/" not in rest:
        return has_taesd_marker(path)
    return True


def clear_run(out: Path) -> list[Path]:
    """``--overwrite``: remove taesd's own files from the run folder ``out``; returns what was kept."""
    check_overwritable(out)
    kept = []
    for path in sorted(out.rglob("*"), reverse=True):   # files before their folders
        if path.is_file() or path.is_symlink():
            if path.name == MARKER and path.parent == out:
                continue
            if is_own_output(out, path) and not path.is_symlink():
                path.unlink()
            else:
                kept.append(path)
        elif path.is_dir() and path.relative_to(out).parts[0] in _OWN_NAMES and not any(path.iterdir()):
            path.rmdir()
    return kept


def mark(out: Path) -> None:
    """Write the marker that says taesd made (or took over) this run folder."""
    marker = out / MARKER
    if not marker.is_file():
        marker.write_text(json.dumps({"written_by": "taesd train"}) + "\n")
