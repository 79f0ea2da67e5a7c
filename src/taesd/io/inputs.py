"""The user's file and folder arguments expanded into the list of inputs to process."""
from __future__ import annotations

from pathlib import Path

from taesd.errors import TaesdError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
LATENT_SUFFIXES = (".safetensors", ".png")


def expand_inputs(paths, suffixes: tuple[str, ...], what: str = "image") -> list[Path]:
    """Files named directly, plus the files with ``suffixes`` inside named folders (recursively)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise TaesdError(f"{p} does not exist")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes
                           and not f.name.startswith("."))
            if not found:
                raise TaesdError(f"folder {p} holds no {what} files ({', '.join(suffixes)})")
            out += found
        else:
            out.append(p)
    if not out:
        raise TaesdError(f"no {what} files given")
    return out
