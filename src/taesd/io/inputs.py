"""The user's file and folder arguments expanded into the list of inputs to process.

Files named directly are always taken. Inside named folders (searched recursively, hidden files
skipped) files that taesd itself wrote are skipped, so that a second run over a folder does not
take the first run's outputs for inputs. They are recognised by name, the names taesd's commands
give them: ``*.<variant>.png`` (8-bit latents), ``*.roundtrip.<ext>``, ``*.decoded.<ext>``,
``*.<n>.decoded.<ext>``, ``grid.png`` beside an ``eval.json``; and, for PNGs under any name, by
the ``taesd_variant`` text chunk every latent PNG carries. Each input keeps the folder argument it
was found under (``root``), so outputs can keep its relative path. The names come from
``taesd.io.naming``, the module the commands make them with.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

from taesd import settings
from taesd.errors import TaesdError
from taesd.io.naming import is_latent_png_name, is_output_image_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
LATENT_SUFFIXES = (".safetensors", ".png")


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
    if is_output_image_name(name) or (name == "grid.png" and (path.parent / "eval.json").is_file()):
        return True
    if what == "image" and path.suffix.lower() == ".png":
        return is_latent_png_name(name) or _has_latent_marker(path)
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
    """``load_image`` (whose pixel guard refuses an image over the limit, see ``taesd.io.images``),
    plus a note for an image over PIL's decompression-bomb warning threshold when no limit is set.
    Returns (image tensor, note or None)."""
    from PIL import Image

    from taesd.io.images import load_image
    image = load_image(path, channels)
    pixels = image.shape[-1] * image.shape[-2]
    note = None
    if settings.max_image_pixels() is None and Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
        note = (f"{path}: {pixels} pixels, over PIL's decompression-bomb warning threshold of "
                f"{Image.MAX_IMAGE_PIXELS}; set TAESD_MAX_IMAGE_PIXELS to silence this")
    return image, note
