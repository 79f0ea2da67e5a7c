"""``load``: a TAEHV model from a published file, ready to run (the fast CPU executor by default)."""
from __future__ import annotations

from pathlib import Path

from taesd.registry import PARTS, VideoVariant
from taesd.video.fast import make_fast
from taesd.video.model import TAEHV
from taesd.video.weights import load_taehv


def load(path: str | Path, variant: str | VideoVariant | None = None, parts=PARTS, fast: bool = True,
         **model_kwargs) -> TAEHV:
    """``load_taehv`` plus, with ``fast`` (default) on a CPU, ``make_fast`` (same weights, fused
    kernels; decoded pixels within ~1e-5 of the plain network)."""
    model = load_taehv(path, variant=variant, parts=parts, **model_kwargs)
    return make_fast(model) if fast else model
