"""The user's file and folder arguments expanded into the list of inputs to process.

Files named directly are always taken. Inside named folders (searched recursively, hidden files
skipped) files that taesd itself wrote are skipped, so that a second run over a folder does not
take the first run's outputs for inputs. They are recognised by name, the names taesd's commands
give them: ``*.<variant>.png`` (8-bit latents), ``*.roundtrip.<ext>``, ``*.decoded.<ext>``,
``*.<n>.decoded.<ext>``, ``grid.png`` beside an ``eval.json``; and, for PNGs under any name, by
the ``taesd_variant`` text chunk every latent PNG carries. Each input keeps the folder argument it
was found under (``root``), so outputs can keep its relative path.
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from pathlib import Path

from taesd.errors import TaesdError
from taesd.registry import VARIANTS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
LATENT_SUFFIXES = (".safetensors", ".png")

_VARIANT_NAMES = "|".join(sorted(map(re.escape, VARIANTS), key=len, reverse=True))
# Names of the images taesd writes (roundtrip, decode, eval's grid is handled apart).
_IMAGE_OUTPUT = re.compile(r".+\.(roundtrip|decoded|\d+\.decoded)\.[a-z]+$", re.IGNORECASE)
_LATENT_PNG = re.compile(rf".+\.({_VARIANT_NAMES})\.png$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class InputFile:
    path: Path
    root: Path | None = None   # the folder argument it was found in; None when named directly

    @property
    def relative_folder(self) -> Path:
        """Its folder below the folder argument ('' when named directly)."""
        return self.path.parent.relative_to(self.root) if self.root is not None else Path()


def is_taesd_output(path: Path, what: str) -> bool:
    """Whether ``path`` looks like a file taesd wrote that is no ``what`` input (image or latent)."""
    name = path.name
    if _IMAGE_OUTPUT.match(name) or (name == "grid.png" and (path.parent / "eval.json").is_file()):
        return True
    if what == "image" and path.suffix.lower() == ".png":
        return bool(_LATENT_PNG.match(name)) or _has_latent_marker(path)
    return False


def _has_latent_marker(path: Path) -> bool:
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:   # text chunks before the pixel data: no decoding needed
                return any(k.startswith("taesd_variant") for k in img.info)
    except Exception:  # unreadable files are reported when they are read as inputs
        return False


def collect_inputs(paths, suffixes: tuple[str, ...], what: str = "image"
                   ) -> tuple[list[InputFile], list[Path]]:
    """(inputs, skipped taesd outputs) for file and folder arguments; the same file named twice
    (a folder and a file in it, two overlapping folders) is taken once."""
    out: list[InputFile] = []
    skipped: list[Path] = []
    seen: set[str] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise TaesdError(f"{p} does not exist")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            mine = [f for f in found if not is_taesd_output(f, what)]
            skipped += [f for f in found if f not in mine]
            if not mine:
                extra = f" (only {len(skipped)} taesd outputs)" if skipped else ""
                raise TaesdError(f"folder {p} holds no {what} files ({', '.join(suffixes)}){extra}")
            items = [InputFile(f, p) for f in mine]
        else:
            items = [InputFile(p)]
        for item in items:
            key = os.path.realpath(item.path)
            if key not in seen:
                seen.add(key)
                out.append(item)
    if not out:
        raise TaesdError(f"no {what} files given")
    return out, skipped


def expand_inputs(paths, suffixes: tuple[str, ...], what: str = "image") -> list[Path]:
    """Files named directly, plus the files with ``suffixes`` inside named folders (recursively),
    taesd's own outputs left out."""
    return [f.path for f in collect_inputs(paths, suffixes, what)[0]]


def read_image(path: "str | os.PathLike", channels: int = 3):
    """``load_image`` with PIL's decompression-bomb guard as one-line errors: over twice
    ``TAESD_MAX_IMAGE_PIXELS`` (default PIL's 89.5 M) is refused; over it, a warning is returned
    as text. Returns (image tensor, warning or None)."""
    from PIL import Image

    from taesd.io.images import load_image
    limit = os.environ.get("TAESD_MAX_IMAGE_PIXELS", "").strip()
    if limit and not limit.isdigit():
        raise TaesdError(f"TAESD_MAX_IMAGE_PIXELS must be a whole number of pixels, not {limit!r}")
    saved, note = Image.MAX_IMAGE_PIXELS, None
    try:
        if limit:
            Image.MAX_IMAGE_PIXELS = int(limit)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            image = load_image(path, channels)
        for w in caught:
            if issubclass(w.category, Image.DecompressionBombWarning):
                note = f"{path}: {str(w.message).split(',')[0]} (PIL's decompression-bomb warning)"
    except Image.DecompressionBombError as e:
        raise TaesdError(f"refusing {path}: {str(e).split(',')[0]} (a decompression bomb?); set "
                         f"TAESD_MAX_IMAGE_PIXELS to allow bigger images") from e
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    return image, note
