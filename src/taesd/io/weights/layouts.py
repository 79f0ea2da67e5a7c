"""The key layouts of TAESD weight files, one table: how each is recognised, split into
{part: state dict in original keys}, joined back, and named on disk. A file has exactly one layout,
decided once by ``detect`` (never relabelled afterwards).

  pth          ``<name>_<part>.pth``: one part, original keys (``0.weight``, ``3.conv.0.weight`` ...)
  safetensors  ``<name>_<part>.safetensors``: the same keys, one part per file
  diffusers    an AutoencoderTiny folder: ``config.json`` + ``diffusion_pytorch_model.*`` with
               ``encoder.layers.N`` / ``decoder.layers.N-1`` (diffusers' decoder has no Clamp layer)
  combined     one ``.safetensors`` file with both parts in diffusers' keys, any architecture (the
               hub's ``taef2.safetensors`` and ``taeqi2_1.safetensors``)
  comfyui      one file with ``taesd_encoder.N`` / ``taesd_decoder.N`` + ``vae_scale`` / ``vae_shift``
               (taef2: per-part files and one ``encoder.N`` / ``decoder.N`` file, marked
               ``target=comfyui`` in their metadata; see comfyui.py)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

import torch

from taesd.errors import TaesdError
from taesd.io.weights.read import DIFFUSERS_WEIGHT_NAMES, StateDict
from taesd.registry import PARTS, Variant

EXTRAS = ("vae_scale", "vae_shift")
Parts = dict[str, StateDict]


class Layout(str, Enum):
    PTH = "pth"
    SAFETENSORS = "safetensors"
    DIFFUSERS = "diffusers"
    COMFYUI = "comfyui"
    COMBINED = "combined"

    def __str__(self) -> str:
        return self.value


FORMATS = tuple(str(layout) for layout in Layout)


# ---------------------------------------------------------------- key mappings

def to_diffusers_keys(parts: Parts) -> StateDict:
    """Original keys -> diffusers' (``encoder.layers.N``, ``decoder.layers.N-1``: diffusers'
    decoder Sequential has no Clamp layer, the clamp happens in its forward)."""
    out: StateDict = {}
    for part, sd in parts.items():
        offset = 1 if part == "decoder" else 0
        for k, t in sd.items():
            idx, rest = k.split(".", 1)
            out[f"{part}.layers.{int(idx) - offset}.{rest}"] = t
    return out


def from_diffusers_keys(raw: StateDict) -> Parts:
    """Diffusers' keys -> {part: state dict in original keys} (inverse of ``to_diffusers_keys``);
    keys outside ``encoder.layers`` / ``decoder.layers`` are ignored."""
    parts: Parts = {}
    for k, t in raw.items():
        m = re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.*)", k)
        if m:
            part, idx, rest = m.group(1), int(m.group(2)), m.group(3)
            parts.setdefault(part, {})[f"{idx + (1 if part == 'decoder' else 0)}.{rest}"] = t
    return parts


def _prefixed(raw: StateDict) -> Parts:
    """``taesd_encoder.N`` / ``encoder.N`` keys -> parts; a file without them is one part ("?")."""
    parts: Parts = {}
    for k, t in raw.items():
        for part in PARTS:
            for prefix in (f"taesd_{part}.", f"{part}."):
                if k.startswith(prefix):
                    parts.setdefault(part, {})[k[len(prefix):]] = t
    return parts or {"?": {k: t for k, t in raw.items() if k not in EXTRAS}}


def _one_part(raw: StateDict) -> Parts:
    return {"?": {k: t for k, t in raw.items() if k not in EXTRAS}}


def _plain(parts: Parts) -> StateDict:
    (sd,) = parts.values()
    return dict(sd)


def _comfy_keys(parts: Parts) -> StateDict:
    return {f"taesd_{part}.{k}": t for part, sd in parts.items() for k, t in sd.items()}


# ---------------------------------------------------------------- the table

def _has_layers(keys) -> bool:
    return any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in keys)


def _in_diffusers_folder(path: Path) -> bool:
    return path.is_dir() or path.name in DIFFUSERS_WEIGHT_NAMES


def _comfy(keys, path: Path, meta: dict) -> bool:
    if meta.get("target") == "comfyui":
        return True
    return not _has_layers(keys) and any(k.startswith(("taesd_encoder.", "taesd_decoder.", "encoder.",
                                                       "decoder.")) for k in keys)


@dataclass(frozen=True)
class LayoutSpec:
    detect: Callable[[list, Path, dict], bool]         # (keys, path, safetensors metadata) -> is it
    split: Callable[[StateDict], Parts]                # raw tensors -> {part or "?": original keys}
    join: Callable[[Parts], StateDict]                 # parts -> the tensors one file stores
    filenames: Callable[[Variant, tuple], list[str]]   # what a writer names its files
    one_file: bool                                     # both parts in one file


# In detection order: the first whose ``detect`` accepts a file is its layout.
LAYOUTS: dict[Layout, LayoutSpec] = {
    Layout.DIFFUSERS: LayoutSpec(lambda keys, path, meta: _has_layers(keys) and _in_diffusers_folder(path),
                                 from_diffusers_keys, to_diffusers_keys,
                                 lambda v, parts: ["config.json", DIFFUSERS_WEIGHT_NAMES[0]], True),
    Layout.COMBINED: LayoutSpec(lambda keys, path, meta: _has_layers(keys), from_diffusers_keys,
                                to_diffusers_keys, lambda v, parts: [f"{v.name}.safetensors"], True),
    Layout.COMFYUI: LayoutSpec(_comfy, _prefixed, _comfy_keys, lambda v, parts: [f"{v.name}.safetensors"],
                               True),
    Layout.SAFETENSORS: LayoutSpec(lambda keys, path, meta: path.suffix == ".safetensors", _one_part, _plain,
                                   lambda v, parts: [f"{v.name}_{p}.safetensors" for p in parts], False),
    Layout.PTH: LayoutSpec(lambda keys, path, meta: True, _one_part, _plain,
                           lambda v, parts: [v.part_file(p) for p in parts], False),
}


def detect(raw: StateDict, path: Path, meta: dict) -> Layout:
    keys = list(raw)
    return next(layout for layout, spec in LAYOUTS.items() if spec.detect(keys, path, meta))


def layout_of(name: "str | Layout") -> Layout:
    try:
        return Layout(str(name))
    except ValueError:
        raise TaesdError(f"unknown weight format {name!r}; choose one of: {', '.join(FORMATS)}") from None


# ---------------------------------------------------------------- vae_scale / vae_shift

def extra_value(key: str, t: torch.Tensor) -> "float | list[float]":
    """A stored vae_scale / vae_shift: a scalar, or per channel (C, C x 1 x 1: ComfyUI's Qwen 2.1)."""
    if not t.is_floating_point() or not bool(torch.isfinite(t).all()) or t.numel() == 0 \
            or not (t.numel() == 1 or (t.ndim in (1, 3) and t.shape[1:] in ((), (1, 1)))):
        raise TaesdError(f"{key} is {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}; expected a finite "
                         f"float scalar or one value per latent channel (C or C x 1 x 1)")
    return float(t.reshape(())) if t.numel() == 1 else [float(x) for x in t.flatten()]


def extras_of(raw: StateDict) -> "dict[str, float | list[float]]":
    return {k: extra_value(k, raw[k]) for k in EXTRAS if k in raw}


def check_extras(path: Path, extras: dict, channels: int) -> None:
    """Per-channel values must be one per latent channel of the network the file holds."""
    for k, val in extras.items():
        if isinstance(val, list) and len(val) != channels:
            raise TaesdError(f"{path}: {k} holds {len(val)} values but the network has {channels} latent "
                             f"channels; the file is damaged, set {k} to a scalar or one value per channel")
