"""One weight file or folder -> a checked ``WeightSource``: read (bounded), detect its layout once,
split into parts, name each part from its tensor shapes (never the file name), check the tensors."""
from __future__ import annotations

import os
from pathlib import Path

from taesd.errors import TaesdError
from taesd.io.weights.identify import identify
from taesd.io.weights.layouts import LAYOUTS, check_extras, detect, extras_of
from taesd.io.weights.read import WeightSource, check_tensors, diffusers_weight_file, read_tensors, sha256_of
from taesd.registry import get_variant


def read_source(path: str | os.PathLike) -> WeightSource:
    """Read a weight file or folder and work out which parts it holds (from shapes, not names)."""
    path = Path(path)
    raw, meta = read_tensors(path)
    layout = detect(raw, path, meta)
    extras = extras_of(raw)
    parts = LAYOUTS[layout].split(raw)
    if "?" in parts:
        sd = parts.pop("?")
        found = identify(sd) if sd else []
        if not found:
            first = f" (first key {next(iter(sd))!r})" if sd else ""
            raise TaesdError(f"{path} holds {len(sd)} tensors that match no TAESD encoder or decoder{first}; "
                             f"pass a TAESD weight file")
        parts = {found[0].split(":")[1]: sd}
    channels = None
    for part, sd in parts.items():
        check_tensors(path, sd)
        names = identify(sd, part)
        if not names:
            raise TaesdError(f"{path} holds {len(sd)} {part} tensors that match no TAESD variant; "
                             f"the file is damaged or of another model")
        channels = get_variant(names[0]).latent_channels
    check_extras(path, extras, channels)
    real = diffusers_weight_file(path) if path.is_dir() else path
    return WeightSource(path, str(layout), parts, extras, sha256_of(real), meta)
