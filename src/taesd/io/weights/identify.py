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


def identify_variant(parts: dict[str, StateDict], hints=(), asked: str | None = None,
                     flag: str = "--variant {}") -> str:
    """The one variant whose shapes fit every part: the ``asked`` one (checked), the only fit, or the
    fit a file/folder/repo name in ``hints`` starts with (taesdxl_encoder.pth settles taesd vs
    taesdxl); else a one-line error naming ``flag`` with the choices."""
    from taesd.errors import TaesdError
    candidates = None
    for part, sd in parts.items():
        names = identify(sd, part)
        candidates = names if candidates is None else [n for n in candidates if n in names]
    what = " and ".join(describe(sd, p) for p, sd in parts.items())
    if not candidates:
        raise TaesdError(f"the weights given hold {what}: no one variant has them all"
                         if len(parts) > 1 else f"the weights given hold {what}")
    if asked:
        asked = get_variant(asked).name
        if asked not in candidates:
            raise TaesdError(f"{flag.format(asked)} contradicts the weights: they hold {what}")
        return asked
    if len(candidates) == 1:
        return candidates[0]
    for hint in hints:
        stem = str(hint).rstrip("/").replace("\\", "/").rsplit("/", 1)[-1].lower()
        for name in sorted(candidates, key=len, reverse=True):
            if stem == name or stem.startswith((f"{name}_", f"{name}-", f"{name}.")):
                return name
    raise TaesdError(f"the weights hold {what}, which fits {' and '.join(candidates)} (same shapes, "
                     f"different latent spaces); pass {' or '.join(flag.format(c) for c in candidates)}")
