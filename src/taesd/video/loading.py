"""``load``: a TAEHV model from a published file, ready to run (the fast CPU executor by default)."""
from __future__ import annotations

from pathlib import Path

from taesd.registry import PARTS, VideoVariant
from taesd.runtime.dtypes import resolve_dtype
from taesd.video.fast import make_fast
from taesd.video.model import TAEHV
from taesd.video.weights import load_taehv


def load(path: str | Path, variant: str | VideoVariant | None = None, parts=PARTS, fast: bool = True,
         dtype=None, **model_kwargs) -> TAEHV:
    """``load_taehv`` plus, with ``fast`` (default) on a CPU, ``make_fast`` (same weights, fused
    kernels; in fp32 decoded pixels within ~1e-5 of the plain network). ``dtype`` ("fp32", "bf16",
    "fp16" or a torch dtype): the weights' and computation's dtype; None: fp32 weights, computed in
    bf16 on AMX and AVX-512-BF16 CPUs as the image models are (``$TAESD_CPU_BF16=0`` or
    dtype="fp32": fp32). Inputs may be any float dtype; outputs come back in the input's."""
    model = load_taehv(path, variant=variant, parts=parts, **model_kwargs)
    if dtype is not None:
        model.to(resolve_dtype(dtype))
    return make_fast(model, bf16=None if dtype is None else False) if fast else model
