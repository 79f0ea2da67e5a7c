"""Latent files: exact ``.safetensors`` and 8-bit ``.png`` (the published layout).

8-bit: byte = round(255 * clamp(latent / (2 * 3) + 0.5, 0, 1)); latent = (byte / 255 - 0.5) * 6.
A latent of 4k channels is one RGBA PNG of k 4-channel tiles stacked vertically (channels 0-3 on
top), so the PNG is w wide and k*h tall. The variant and original image size go into the PNG's
text chunks and the safetensors metadata, so decoding needs no flags.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from taesd.errors import TaesdError
from taesd.io.files import atomic_path
from taesd.registry import Variant, get_variant

LATENT_MAGNITUDE = 3.0
LATENT_SHIFT = 0.5


def quantize(latents: torch.Tensor) -> torch.Tensor:
    """Latents -> uint8 in the published 8-bit convention."""
    scaled = (latents.float() / (2 * LATENT_MAGNITUDE) + LATENT_SHIFT).clamp(0, 1)
    return scaled.mul(255).round().to(torch.uint8)


def dequantize(q: torch.Tensor) -> torch.Tensor:
    return (q.float() / 255 - LATENT_SHIFT) * (2 * LATENT_MAGNITUDE)


def to_png_array(latent: torch.Tensor) -> np.ndarray:
    """One latent C x h x w (C a multiple of 4) -> uint8 array (C/4 * h) x w x 4."""
    c, h, w = latent.shape
    if c % 4:
        raise TaesdError(f"8-bit PNG latents need a multiple of 4 channels, got {c}")
    q = quantize(latent.cpu())
    return q.reshape(c // 4, 4, h, w).permute(0, 2, 3, 1).reshape(c // 4 * h, w, 4).numpy()


def from_png_array(arr: np.ndarray, channels: int) -> torch.Tensor:
    tall, w, four = arr.shape
    k = channels // 4
    if four != 4 or tall % k:
        raise TaesdError(f"PNG of {w}x{tall} with {four} channels is no {channels}-channel latent "
                         f"(expected RGBA, height a multiple of {k})")
    q = torch.from_numpy(np.array(arr, copy=True)).reshape(k, tall // k, w, 4).permute(0, 3, 1, 2)
    return dequantize(q.reshape(channels, tall // k, w))


def save_latents(path: "str | os.PathLike", latents: torch.Tensor, variant: "str | Variant",
                 image_size: "tuple[int, int] | None" = None) -> Path:
    """Write latents (C x h x w or N x C x h x w; PNG: one latent) atomically."""
    path, v = Path(path), get_variant(variant)
    if latents.shape[-3] != v.latent_channels:
        raise TaesdError(f"{v.name} latents have {v.latent_channels} channels, got {latents.shape[-3]}")
    meta = {"variant": v.name, "shape": json.dumps(list(latents.shape))}
    if image_size is not None:
        meta["image_size"] = json.dumps(list(image_size))
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        with atomic_path(path) as tmp:
            save_file({"latents": latents.detach().cpu().contiguous()}, str(tmp),
                      metadata={**meta, "format": "taesd-latents"})
    elif suffix == ".png":
        if latents.ndim == 4:
            if latents.shape[0] != 1:
                raise TaesdError("a PNG holds one latent; save a batch as .safetensors or one PNG each")
            latents = latents[0]
        info = PngImagePlugin.PngInfo()
        for k, val in meta.items():
            info.add_text(f"taesd_{k}", val)
        with atomic_path(path) as tmp:
            Image.fromarray(to_png_array(latents), "RGBA").save(tmp, format="PNG", pnginfo=info)
    else:
        raise TaesdError(f"latent files are .safetensors (exact) or .png (8-bit), not {path.name}")
    return path


def load_latents(path: "str | os.PathLike", variant: "str | Variant | None" = None
                 ) -> tuple[torch.Tensor, Variant, "tuple[int, int] | None"]:
    """Read a latent file -> (latents N x C x h x w, variant, original image size or None)."""
    path = Path(path)
    if not path.is_file():
        raise TaesdError(f"latent file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if "latents" not in f.keys():
                    raise TaesdError(f"{path} holds no 'latents' tensor; is it a weight file?")
                latents = f.get_tensor("latents")
        except TaesdError:
            raise
        except Exception as e:
            raise TaesdError(f"cannot read latent file {path}: {str(e).splitlines()[0][:120]}") from e
        if latents.ndim == 3:
            latents = latents[None]
        if latents.ndim != 4:
            raise TaesdError(f"{path} holds a {latents.ndim}-dimensional 'latents' tensor; "
                             f"latents are N x C x h x w")
    elif suffix == ".png":
        try:
            with Image.open(path) as img:
                img.load()
                meta = {k[len("taesd_"):]: val for k, val in img.text.items() if k.startswith("taesd_")}
                if img.mode != "RGBA":
                    raise TaesdError(f"{path} is a {img.mode} PNG; 8-bit latents are RGBA PNGs")
                arr = np.asarray(img)
        except TaesdError:
            raise
        except Exception as e:
            raise TaesdError(f"cannot read latent PNG {path}: {str(e).splitlines()[0][:120]}") from e
        latents = None
    else:
        raise TaesdError(f"latent files are .safetensors or .png, not {path.name}")
    stored = meta.get("variant")
    if stored is not None and _variant_or_none(stored) is None:
        raise TaesdError(f"{path} names an unknown variant {stored!r} in its metadata; "
                         f"pass the variant (--variant)")
    if variant is None and stored is None:
        raise TaesdError(f"{path} does not say which variant made it; pass the variant (--variant)")
    v = get_variant(variant if variant is not None else stored)
    if stored is not None and variant is not None and get_variant(stored).name != v.name:
        raise contradiction(path, v, get_variant(stored))
    if latents is None:
        latents = from_png_array(arr, v.latent_channels)[None]
    if latents.shape[1] != v.latent_channels:
        raise TaesdError(f"{path} holds {latents.shape[1]}-channel latents; "
                         f"{v.name} needs {v.latent_channels}")
    if latents.numel() == 0:
        raise TaesdError(f"{path} holds empty latents ({'x'.join(map(str, latents.shape))})")
    if "shape" in meta:
        shape = _json_ints(path, meta, "shape")
        if tuple(shape[-3:]) != tuple(latents.shape[-3:]) or len(shape) not in (3, 4):
            raise TaesdError(f"{path}: its metadata says {stored or v.name} latents of shape {shape}, but "
                             f"it holds {list(latents.shape[-3:])}; the file was changed or is not a "
                             f"TAESD latent file")
    size = None
    if "image_size" in meta:
        size = tuple(_json_ints(path, meta, "image_size"))
        check_image_size(path, size, latents.shape[-2:], v)
    return latents, v, size


def contradiction(path, asked: Variant, stored: Variant) -> TaesdError:
    """The variant asked for (--variant) disagrees with the one the file says made it: the flag is the
    culprit (the metadata is written by ``taesd encode`` with the latents), named with the fix."""
    same = "the same channel count, another latent space" if asked.latent_channels == stored.latent_channels \
        else f"{stored.latent_channels} channels; {asked.name} needs {asked.latent_channels}"
    return TaesdError(f"--variant {asked.name} contradicts {path}: it holds {stored.name} latents ({same}); "
                      f"drop --variant (or pass --variant {stored.name}) to decode them right")


def _variant_or_none(name: str) -> "Variant | None":
    try:
        return get_variant(name)
    except (TaesdError, KeyError, ValueError):
        return None


def _json_ints(path: Path, meta: dict, key: str) -> list[int]:
    try:
        value = json.loads(meta[key])
    except (json.JSONDecodeError, TypeError):
        value = None
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise TaesdError(f"{path}: malformed {key!r} metadata {str(meta[key])[:60]!r} (expected a list of "
                         f"whole numbers); remove it or write the file again with `taesd encode`")
    return value


def check_image_size(path, size: tuple, latent_hw, v: Variant) -> None:
    """The stored original image size must be two positive numbers that pad up to the latent grid."""
    d = v.downscale
    grid = tuple(int(n) * d for n in latent_hw)
    if len(size) != 2 or any(s <= 0 for s in size) or any(not g - d < s <= g for s, g in zip(size, grid)):
        raise TaesdError(f"{path}: stored image size {list(size)} does not fit the "
                         f"{latent_hw[0]}x{latent_hw[1]} "
                         f"latent (images of {grid[0] - d + 1}-{grid[0]} x {grid[1] - d + 1}-{grid[1]} px); "
                         f"the metadata is wrong, remove it or encode again")
