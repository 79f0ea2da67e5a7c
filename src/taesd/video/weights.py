"""TAEHV weight files: read the published layouts, and say which variant a state dict is from its
tensor shapes alone (never the file name, unlike upstream).

Published files hold both parts in one state dict with keys ``encoder.N.*`` and ``decoder.N.*``:
``<name>.pth`` (a plain ``torch.save`` dict) and ``safetensors/<name>.safetensors`` (same keys).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from taesd.errors import TaesdError
from taesd.io.weights.read import read_file
from taesd.nn.taehv import build_video_part
from taesd.registry import PARTS, VIDEO_VARIANTS, VideoVariant, get_video_variant
from taesd.video.model import TAEHV

StateDict = dict[str, torch.Tensor]


def read_state_dict(path: str | Path) -> StateDict:
    """A ``.pth`` or ``.safetensors`` file's tensors (fp16 in the published files), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise TaesdError(f"no weight file at {path}; pass the path of a taehv .pth or .safetensors file")
    # The image weights' reader: bounded unpacking, no code run, damaged files refused in one line.
    return read_file(path)


@lru_cache(maxsize=None)
def _signature(name: str, part: str) -> tuple:
    with torch.device("meta"):
        module = build_video_part(name, part)
    return tuple(sorted((f"{part}.{k}", tuple(v.shape)) for k, v in module.state_dict().items()))


def _matches(sd: StateDict, signature: tuple) -> bool:
    for key, shape in signature:
        got = sd.get(key)
        if got is None:
            return False
        # a TGrow weight may hold more timesteps than the stage uses (upstream keeps the last ones)
        grown = got.ndim == 4 and got.shape[1:] == shape[1:] and got.shape[0] == 2 * shape[0]
        if tuple(got.shape) != shape and not grown:
            return False
    return True


def identify_video(sd: StateDict) -> list[str]:
    """Names of the video variants whose every part present in ``sd`` has these keys and shapes
    (several variants share a layout, e.g. taehv/taew2_1/taecvx/taeos1_3)."""
    present = [p for p in PARTS if any(k.startswith(p + ".") for k in sd)]
    if not present:
        return []
    names = []
    for name in VIDEO_VARIANTS:
        sigs = [_signature(name, p) for p in present]
        if sum(len(s) for s in sigs) == len(sd) and all(_matches(sd, s) for s in sigs):
            names.append(name)
    return names


def load_taehv(path: str | Path, variant: str | VideoVariant | None = None, parts=PARTS,
               **model_kwargs) -> TAEHV:
    """A ``TAEHV`` from a published file. ``variant`` names it; without, the shapes decide, and a
    layout several variants share needs the name (their framing differs)."""
    sd = read_state_dict(path)
    names = identify_video(sd)
    if variant is None:
        if len(names) != 1:
            found = "/".join(names) or "no TAEHV variant"
            raise TaesdError(f"{path}: its tensors fit {found}; pass variant= to say which")
        variant = names[0]
    v = get_video_variant(variant)
    if v.name not in names:
        raise TaesdError(f"{path} is not a {v.name} file (its shapes fit {'/'.join(names) or 'none'}); "
                         "check the file or the variant name")
    model = TAEHV(v, parts=parts, **model_kwargs)
    model.load_state_dict({k: t.float() for k, t in sd.items()})
    model.weights_info = {"path": str(path), "variant": v.name}
    return model.eval().requires_grad_(False)
