"""What a state dict holds, from its tensor shapes alone (never the file name): the variants
whose encoder or decoder has exactly these keys and shapes, computed on the meta device."""
from __future__ import annotations

from functools import lru_cache

import torch

from taesd.nn.arch import build_part
from taesd.registry import PARTS, VARIANTS, get_variant

StateDict = dict[str, torch.Tensor]


@lru_cache(maxsize=None)
def _signature(variant: str, part: str) -> tuple:
    with torch.device("meta"):
        module = build_part(variant, part)
    return tuple(sorted((k, tuple(v.shape)) for k, v in module.state_dict().items()))


def _sig_of(sd: StateDict) -> tuple:
    return tuple(sorted((k, tuple(v.shape)) for k, v in sd.items()))


def identify(sd: StateDict, part: str | None = None) -> list[str]:
    """Names of the variants whose ``part`` (or either part) has exactly these keys and shapes."""
    sig = _sig_of(sd)
    parts = PARTS if part in (None, "?") else (part,)
    return [f"{name}:{p}" if part in (None, "?") else name
            for name in VARIANTS for p in parts if _signature(name, p) == sig]


def describe(sd: StateDict, part: str) -> str:
    """'a 16-channel decoder (taesd3/taef1)' from the tensors alone."""
    names = identify(sd, part)
    if not names:
        return f"{len(sd)} tensors that are no TAESD {part}"
    channels = get_variant(names[0]).latent_channels
    return f"a {channels}-channel {part} ({'/'.join(names)})"
