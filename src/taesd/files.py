"""Files in and out: atomic writes (never a half-written output) and expanding the user's
file/folder arguments into a list of inputs."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import TaesdError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
LATENT_SUFFIXES = (".safetensors", ".png")


@contextlib.contextmanager
def atomic_path(path: "str | os.PathLike"):
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
