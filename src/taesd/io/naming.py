"""The names and the marker of the files taesd writes, in one place: the commands make output names
here, and the input collector (``io/inputs``) recognises them here, so the two cannot drift apart.

Names (``stem`` is the input's file name without its last suffix):
- ``encode``:    ``<stem>.<variant>.<format>``            (``photo.taef2.safetensors``, ``photo.taef2.png``)
- ``roundtrip``: ``<stem>.<variant>.roundtrip.png``
- ``decode``:    ``<stem>.decoded.png`` (the ``.<variant>`` part of a latent file's stem dropped), and
  ``<stem>.<i>.decoded.png`` for each image of a batch file.

Marker: every image ``save_image`` writes, every latent file and every ONNX export carries text that
says taesd wrote it (``taesd_*`` PNG chunks, a JPEG/GIF comment, WebP XMP, the TIFF description,
``format: taesd-latents`` safetensors metadata, ``taesd.*`` ONNX metadata). ``--overwrite`` replaces an
existing file only when it carries the marker (``has_taesd_marker``), so a user's own file that happens
to have an output's name is never replaced. Formats with no place for a marker (CSV, JSON, BMP, .pth)
are taesd's by name alone (``carries_markers``).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

from taesd.registry import VARIANTS

MARKER = "written by taesd"          # the text of the image marker (PNG chunk ``taesd_output``)
PNG_MARKER_KEY = "taesd_output"

ROUNDTRIP = "roundtrip"
DECODED = "decoded"

_VARIANT_NAMES = "|".join(sorted(map(re.escape, VARIANTS), key=len, reverse=True))
_IMAGE_OUTPUT = re.compile(rf".+\.({ROUNDTRIP}|{DECODED}|\d+\.{DECODED})\.[a-z]+$", re.IGNORECASE)
_LATENT_PNG = re.compile(rf".+\.({_VARIANT_NAMES})\.png$", re.IGNORECASE)


def latent_name(stem: str, variant: str, fmt: str) -> str:
    return f"{stem}.{variant}.{fmt}"


def roundtrip_name(stem: str, variant: str) -> str:
    return f"{stem}.{variant}.{ROUNDTRIP}.png"


def decoded_names(latent_stem: str, variant: str, count: int) -> list[str]:
    """One name per image of a latent file (``count`` images), its ``.<variant>`` part dropped."""
    stem = latent_stem
    if stem.lower().endswith("." + variant.lower()):
        stem = stem[: -len(variant) - 1]
    if count == 1:
        return [f"{stem}.{DECODED}.png"]
    return [f"{stem}.{i}.{DECODED}.png" for i in range(count)]


def is_output_image_name(name: str) -> bool:
    """A name ``roundtrip`` or ``decode`` gives its images."""
    return bool(_IMAGE_OUTPUT.match(name))


def is_latent_png_name(name: str) -> bool:
    """A name ``encode --format png`` gives its latent PNGs."""
    return bool(_LATENT_PNG.match(name))


# ---------------------------------------------------------------- the marker

def image_marker_options(fmt: str) -> dict:
    """PIL ``save`` keywords that put the marker into an image of format ``fmt`` ({} where the format
    has no place for text, e.g. BMP)."""
    from PIL import PngImagePlugin
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text(PNG_MARKER_KEY, MARKER)
        return {"pnginfo": info}
    if fmt in ("JPEG", "GIF"):
        return {"comment": MARKER.encode()}
    if fmt == "WEBP":
        return {"xmp": MARKER.encode()}
    if fmt == "TIFF":
        return {"tiffinfo": {270: MARKER}}
    return {}


# The formats taesd marks; a file of another format (eval.csv, a .pth, a BMP) is taesd's by its name.
MARKED_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".tif", ".tiff", ".safetensors", ".onnx")


def carries_markers(path: Path) -> bool:
    return Path(path).suffix.lower() in MARKED_SUFFIXES


def has_taesd_marker(path: Path) -> bool:
    """Whether the file at ``path`` carries a marker taesd writes (see the module docstring)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return _safetensors_marked(path)
        if suffix == ".onnx":
            return _onnx_marked(path)
        return _image_marked(path)
    except Exception:   # unreadable, truncated, not what its suffix says: not provably ours
        return False


def _safetensors_marked(path: Path) -> bool:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return meta.get("format", "").startswith("taesd")   # latents: taesd-latents; weights: taesd


def _onnx_marked(path: Path) -> bool:
    import onnx
    proto = onnx.load(str(path), load_external_data=False)
    return any(p.key.startswith("taesd.") for p in proto.metadata_props)


def _image_marked(path: Path) -> bool:
    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as img:   # text comes before the pixels: nothing is decoded
            info = img.info
            if any(str(k).startswith("taesd_") for k in info):
                return True
            text = info.get("comment") or info.get("xmp") or b""
            if isinstance(text, str):
                text = text.encode()
            if MARKER.encode() in text:
                return True
            tags = getattr(img, "tag_v2", None)
            return bool(tags) and MARKER in str(tags.get(270, ""))
