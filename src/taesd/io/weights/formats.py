"""Weight formats: read every published TAESD weight format into state dicts and write any of them.

Formats (all hold state dicts keyed like the flat ``nn.Sequential`` in ``model.py``):
  pth          original ``<name>_encoder.pth`` / ``<name>_decoder.pth``; fp16 plain state dicts
  safetensors  the same keys in a ``.safetensors`` file, one part per file
  diffusers    a folder with ``config.json`` + ``diffusion_pytorch_model.safetensors``
               (``encoder.layers.N``, ``decoder.layers.N-1``: diffusers' decoder has no Clamp layer)
  comfyui      one file holding ``taesd_encoder.N`` / ``taesd_decoder.N`` (+ ``vae_scale``/``vae_shift``)
  combined     one ``.safetensors`` file holding both parts in diffusers' keys, any architecture (the
               hub's ``taef2.safetensors`` in madebyollin/taef2,
               ``taeqi2_1.safetensors`` in madebyollin/taeqi2_1)
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from taesd.errors import TaesdError
from taesd.io.files import atomic_path
from taesd.io.weights.identify import identify
from taesd.registry import PARTS, Arch, Variant, get_variant

FORMATS = ("pth", "safetensors", "diffusers", "comfyui", "combined")
WEIGHTS_ENV = "TAESD_WEIGHTS"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
# What diffusers' save_pretrained may write: safetensors or pickle (safe_serialization=False), plain
# or as the fp16 variant (variant="fp16"); read in this order.
DIFFUSERS_WEIGHT_NAMES = (DIFFUSERS_WEIGHTS, "diffusion_pytorch_model.fp16.safetensors",
                          "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
PUBLISHED_AT = "https://github.com/madebyollin/taesd"
StateDict = dict[str, torch.Tensor]


@dataclass
class WeightSource:
    """What one weight file holds, after reading it."""
    path: Path
    format: str
    parts: dict[str, StateDict]                 # part -> state dict in original (pth) keys
    # comfyui vae_scale / vae_shift: a float, or one float per latent channel (Qwen Image 2.1)
    extras: "dict[str, float | list[float]]" = field(default_factory=dict)
    sha256: str = ""



# ---------------------------------------------------------------- reading files -> state dicts

def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_torch(path: Path) -> StateDict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy-format notices would break the one-line error
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it would call {found.group(1)}" if found else "it needs code to run"
        raise TaesdError(f"refusing to load {path}: unsafe pickle ({what}); TAESD weights are plain "
                         f"state dicts, get the published file from {PUBLISHED_AT}") from e
    except Exception as e:  # truncated zip, not a torch file, ...
        raise TaesdError(f"cannot read {path} as a PyTorch weight file ({_short(e)}); "
                         f"the file is damaged or not a .pth state dict, download it again") from e
    # Training checkpoints sometimes wrap the state dict.
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = type(obj).__name__ if not isinstance(obj, dict) else "a dict that is not all tensors"
        raise TaesdError(f"{path} is not a state dict (it holds {what}); pass a TAESD weight file")
    return dict(obj)


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:
        raise TaesdError(f"cannot read {path} as safetensors ({_short(e)}); "
                         f"the file is damaged or truncated, download or convert it again") from e


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return {}


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:160]


def read_file(path: str | os.PathLike) -> StateDict:
    """The raw tensors of a weight file or diffusers folder (keys as stored)."""
    path = Path(path)
    if not path.exists():
        raise TaesdError(f"weight file {path} does not exist")
    if path.is_dir():
        inner = diffusers_weight_file(path)
        if inner.suffix == ".bin":
            return _read_torch(inner)
        return _read_safetensors(inner)[0]
    if path.stat().st_size == 0:
        raise TaesdError(f"weight file {path} is empty; download it again")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
        return _read_torch(path)
    return _read_safetensors(path)[0]


def diffusers_weight_file(folder: Path) -> Path:
    """The weight file of a diffusers folder (any name ``DIFFUSERS_WEIGHT_NAMES`` lists)."""
    for name in DIFFUSERS_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise TaesdError(f"{folder} is a folder without {' or '.join(DIFFUSERS_WEIGHT_NAMES)}; "
                     f"pass a weight file or a diffusers AutoencoderTiny folder")


def _extra_value(key: str, t: torch.Tensor) -> "float | list[float]":
    """A stored vae_scale / vae_shift: a scalar, or per channel (C, C x 1 x 1: ComfyUI's Qwen 2.1)."""
    if not t.is_floating_point() or not bool(torch.isfinite(t).all()) or t.numel() == 0 \
            or not (t.numel() == 1 or (t.ndim in (1, 3) and t.shape[1:] in ((), (1, 1)))):
        raise TaesdError(f"{key} is {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}; expected a finite "
                         f"float scalar or one value per latent channel (C or C x 1 x 1)")
    return float(t.reshape(())) if t.numel() == 1 else [float(x) for x in t.flatten()]


def split_parts(raw: StateDict) -> tuple[str, dict[str, StateDict], dict[str, float]]:
    """Sort raw tensors into encoder/decoder state dicts in original keys; returns the format too."""
    keys = list(raw)
    extras = {k: _extra_value(k, raw[k]) for k in ("vae_scale", "vae_shift") if k in raw}
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in keys):
        return "diffusers", from_diffusers_keys(raw), extras
    for prefix, fmt in (("taesd_", "comfyui"), ("", "combined")):
        if any(k.startswith((f"{prefix}encoder.", f"{prefix}decoder.")) for k in keys):
            parts = {}
            for k, v in raw.items():
                for part in PARTS:
                    if k.startswith(f"{prefix}{part}."):
                        parts.setdefault(part, {})[k[len(prefix) + len(part) + 1:]] = v
            return fmt, parts, extras
    return "single", {"?": raw}, extras


def read_source(path: str | os.PathLike) -> WeightSource:
    """Read a weight file or folder and work out which parts it holds (from shapes, not names)."""
    path = Path(path)
    raw = read_file(path)
    fmt, parts, extras = split_parts(raw)
    if fmt == "single":
        sd = parts.pop("?")
        found = identify(sd)
        if not found:
            raise TaesdError(f"{path} holds {len(sd)} tensors that match no TAESD encoder or decoder "
                             f"(first key {next(iter(sd))!r}); pass a TAESD weight file")
        parts = {found[0].split(":")[1]: sd}
        fmt = "safetensors" if path.suffix == ".safetensors" else "pth"
    for part, sd in parts.items():
        check_tensors(path, sd)
        if not identify(sd, part):
            raise TaesdError(f"{path} holds {len(sd)} {part} tensors that match no TAESD variant; "
                             f"the file is damaged or of another model")
    if fmt == "combined":
        fmt = "safetensors"
    elif fmt == "diffusers" and path.is_file() and path.name not in DIFFUSERS_WEIGHT_NAMES:
        fmt = "combined"   # diffusers' keys in a file of its own, not an AutoencoderTiny folder
    if fmt == "safetensors" and _safetensors_metadata(path).get("target") == "comfyui":
        fmt = "comfyui"   # what the comfyui target writes for taef2 (per-part files, see _save_comfyui)
    real = diffusers_weight_file(path) if path.is_dir() else path
    return WeightSource(path, fmt, parts, extras, sha256_of(real))


def check_tensors(path: Path, sd: StateDict) -> None:
    """Weights are floating point and finite: an integer, bool or NaN/Inf tensor is a damaged or
    foreign file, refused in one line naming the tensor."""
    for key, t in sd.items():
        if not t.is_floating_point():
            dtype = str(t.dtype).replace("torch.", "")
            raise TaesdError(f"{path}: tensor {key!r} is {dtype}, not floating point; "
                             f"TAESD weights are fp16/fp32, the file is damaged or of another model")
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n = int((~finite).sum())
            raise TaesdError(f"{path}: tensor {key!r} holds {n} NaN/infinite value{'s' if n > 1 else ''}; "
                             f"the weights are damaged, download or train them again")


# ---------------------------------------------------------------- diffusers keys

def to_diffusers_keys(parts: dict[str, StateDict]) -> StateDict:
    """Original keys -> diffusers' (``encoder.layers.N``, ``decoder.layers.N-1``: diffusers'
    decoder Sequential has no Clamp layer, the clamp happens in its forward)."""
    out: StateDict = {}
    for part, sd in parts.items():
        offset = 1 if part == "decoder" else 0
        for k, t in sd.items():
            idx, rest = k.split(".", 1)
            out[f"{part}.layers.{int(idx) - offset}.{rest}"] = t
    return out


def from_diffusers_keys(raw: StateDict) -> dict[str, StateDict]:
    """Diffusers' keys -> {part: state dict in original keys} (inverse of ``to_diffusers_keys``);
    keys outside ``encoder.layers`` / ``decoder.layers`` are ignored."""
    parts: dict[str, StateDict] = {}
    for k, t in raw.items():
        m = re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.*)", k)
        if m:
            part, idx, rest = m.group(1), int(m.group(2)), m.group(3)
            parts.setdefault(part, {})[f"{idx + (1 if part == 'decoder' else 0)}.{rest}"] = t
    return parts


# ---------------------------------------------------------------- writing any format

def diffusers_config(v: Variant) -> dict:
    if v.arch != Arch.BASE:
        raise TaesdError(f"diffusers' AutoencoderTiny cannot hold {v.name} ({v.arch} architecture); "
                         f"use the pth, safetensors or comfyui format")
    return {"_class_name": "AutoencoderTiny", "_diffusers_version": "0.30.0", "act_fn": "relu",
            "decoder_block_out_channels": [64, 64, 64, 64], "encoder_block_out_channels": [64, 64, 64, 64],
            "force_upcast": False, "in_channels": 3, "out_channels": 3,
            "latent_channels": v.latent_channels, "latent_magnitude": 3, "latent_shift": 0.5,
            "num_decoder_blocks": [3, 3, 3, 1], "num_encoder_blocks": [1, 3, 3, 3],
            "scaling_factor": 1.0, "shift_factor": 0.0, "upsample_fn": "nearest",
            "upsampling_scaling_factor": 2}


def _save_safetensors(tensors: StateDict, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_weights(parts: dict[str, StateDict], variant: str | Variant, fmt: str, out: str | os.PathLike,
                 extras: dict[str, float] | None = None) -> list[Path]:
    """Write ``parts`` (original keys) in ``fmt``; ``out`` is a folder (pth, safetensors, diffusers)
    or a file (comfyui). Returns the paths written."""
    v = get_variant(variant)
    out = Path(out)
    meta = {"variant": v.name, "format": "taesd"}
    if fmt in ("pth", "safetensors"):
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for part, sd in parts.items():
            path = out / f"{v.name}_{part}.{fmt}"
            if fmt == "pth":
                with atomic_path(path) as tmp:
                    torch.save(dict(sd), tmp)
            else:
                _save_safetensors(sd, path, {**meta, "part": part})
            written.append(path)
        return written
    if fmt == "diffusers":
        config = diffusers_config(v)
        if set(parts) != set(PARTS):
            raise TaesdError("the diffusers format needs both encoder and decoder weights")
        tensors = to_diffusers_keys(parts)
        out.mkdir(parents=True, exist_ok=True)
        _save_safetensors(tensors, out / DIFFUSERS_WEIGHTS, {"format": "pt"})
        with atomic_path(out / "config.json") as tmp:
            tmp.write_text(json.dumps(config, indent=2) + "\n")
        return [out / "config.json", out / DIFFUSERS_WEIGHTS]
    if fmt == "comfyui":
        return _save_comfyui(parts, v, out, extras, meta)
    if fmt == "combined":
        return [save_combined(parts, v, out)]
    raise TaesdError(f"unknown weight format {fmt!r}; choose one of: {', '.join(FORMATS)}")


def save_combined(parts: dict[str, StateDict], variant: str | Variant, out: str | os.PathLike) -> Path:
    """Both parts in one safetensors file with diffusers' keys (the hub's ``<name>.safetensors``);
    ``out`` is that file or a folder for ``<name>.safetensors``."""
    v = get_variant(variant)
    if set(parts) != set(PARTS):
        raise TaesdError("the combined format holds both parts: pass an encoder and a decoder")
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out / f"{v.name}.safetensors"
    _save_safetensors(to_diffusers_keys(parts), out, {"variant": v.name, "format": "pt"})
    return out


# Architectures ComfyUI's one-file TAESD loader builds right. For the others (taef2's pool branch)
# it builds the plain network and drops the rest, so they get the per-part files it loads instead.
COMFYUI_ONE_FILE_ARCHS = (Arch.BASE, Arch.F32, Arch.F16)


def _save_comfyui(parts, v: Variant, out: Path, extras, meta: dict) -> list[Path]:
    if out.suffix != ".safetensors":
        out = out / f"{v.name}.safetensors"
    if v.arch not in COMFYUI_ONE_FILE_ARCHS:
        # The one file keeps both parts for us, without the taesd_ prefix ComfyUI's one-file loader
        # claims (it would decode with the wrong network); ComfyUI gets the per-part files.
        warnings.warn(f"ComfyUI reads {v.name} only from per-part files: writing {v.name}_<part>.safetensors "
                      f"into {out.parent} (put them in ComfyUI/models/vae_approx); "
                      f"{out.name} holds both parts "
                      f"for taesd", stacklevel=3)
        out.parent.mkdir(parents=True, exist_ok=True)
        written = []
        for part, sd in parts.items():
            path = out.parent / f"{v.name}_{part}.safetensors"
            _save_safetensors(sd, path, {**meta, "part": part, "target": "comfyui"})
            written.append(path)
        combined = {f"{part}.{k}": t for part, sd in parts.items() for k, t in sd.items()}
        _save_safetensors(combined, out, {**meta, "target": "comfyui"})
        return written + [out]
    if out.suffix != ".safetensors":
        out = out / f"{v.name}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"taesd_{part}.{k}": t for part, sd in parts.items() for k, t in sd.items()}
    extras = extras if extras else {"vae_scale": v.vae_scale, "vae_shift": v.vae_shift}
    for k, val in extras.items():
        tensors[k] = comfyui_extra_tensor(k, val, v)
    _save_safetensors(tensors, out, meta)
    return [out]


def comfyui_extra_tensor(key: str, value, v: Variant) -> torch.Tensor:
    """vae_scale / vae_shift as ComfyUI stores it: a scalar, or C x 1 x 1 where its network keeps
    one value per channel (Qwen Image 2.1: 64 x 1 x 1)."""
    per_channel = isinstance(value, (list, tuple)) or v.arch == Arch.F16
    if not per_channel:
        return torch.tensor(float(value), dtype=torch.float32)
    values = list(value) if isinstance(value, (list, tuple)) else [float(value)] * v.latent_channels
    if len(values) != v.latent_channels:
        raise TaesdError(f"{key} has {len(values)} values; "
                         f"{v.name} latents have {v.latent_channels} channels")
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1)


def state_dicts(model) -> dict[str, StateDict]:
    """A loaded TAESD's parts as state dicts in original keys (for ``save_weights``)."""
    return {p: {k: t.detach().cpu() for k, t in getattr(model, p).state_dict().items()} for p in model.parts}
