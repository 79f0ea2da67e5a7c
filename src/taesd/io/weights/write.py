"""Writing weights in any layout (through the table in layouts.py), and casting them safely."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from taesd.errors import TaesdError
from taesd.io.files import atomic_path
from taesd.io.weights import comfyui
from taesd.io.weights.layouts import LAYOUTS, Layout, Parts, layout_of
from taesd.io.weights.read import DIFFUSERS_WEIGHTS, StateDict
from taesd.registry import PARTS, Arch, Variant, get_variant


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


def save_weights(parts: Parts, variant: str | Variant, fmt: "str | Layout", out: str | os.PathLike,
                 extras: dict | None = None) -> list[Path]:
    """Write ``parts`` (original keys) in layout ``fmt``; ``out`` is a folder (pth, safetensors,
    diffusers) or a file (comfyui, combined; a folder gets ``<name>.safetensors``). Returns the paths."""
    v, layout, out = get_variant(variant), layout_of(fmt), Path(out)
    spec = LAYOUTS[layout]
    meta = {"variant": v.name, "format": "taesd"}
    if layout == Layout.COMFYUI:
        return _save_comfyui(parts, v, out, extras, meta)
    if spec.one_file and set(parts) != set(PARTS):
        raise TaesdError(f"the {layout} format holds both parts: pass an encoder and a decoder")
    if layout == Layout.DIFFUSERS:
        config = diffusers_config(v)
        out.mkdir(parents=True, exist_ok=True)
        _save_safetensors(spec.join(parts), out / DIFFUSERS_WEIGHTS, {"format": "pt"})
        with atomic_path(out / "config.json") as tmp:
            tmp.write_text(json.dumps(config, indent=2) + "\n")
        return [out / "config.json", out / DIFFUSERS_WEIGHTS]
    if layout == Layout.COMBINED:
        return [save_combined(parts, v, out)]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for part, name in zip(parts, spec.filenames(v, tuple(parts))):
        path = out / name
        if layout == Layout.PTH:
            with atomic_path(path) as tmp:
                torch.save(spec.join({part: parts[part]}), tmp)
        else:
            _save_safetensors(spec.join({part: parts[part]}), path, {**meta, "part": part})
        written.append(path)
    return written


def save_combined(parts: Parts, variant: str | Variant, out: str | os.PathLike) -> Path:
    """Both parts in one safetensors file with diffusers' keys (the hub's ``<name>.safetensors``);
    ``out`` is that file or a folder for ``<name>.safetensors``."""
    v = get_variant(variant)
    if set(parts) != set(PARTS):
        raise TaesdError("the combined format holds both parts: pass an encoder and a decoder")
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out / LAYOUTS[Layout.COMBINED].filenames(v, PARTS)[0]
    _save_safetensors(LAYOUTS[Layout.COMBINED].join(parts), out, {"variant": v.name, "format": "pt"})
    return out


def _save_comfyui(parts: Parts, v: Variant, out: Path, extras, meta: dict) -> list[Path]:
    comfyui.check_target(v)
    if out.suffix != ".safetensors":
        out = out / LAYOUTS[Layout.COMFYUI].filenames(v, tuple(parts))[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    if v.arch in comfyui.PER_PART_ARCHS:
        # ComfyUI builds this network right only from per-part files in vae_approx; the one file keeps
        # both parts for taesd, without the taesd_ prefix ComfyUI's one-file loader claims.
        warnings.warn(f"ComfyUI reads {v.name} only from per-part files: writing {v.name}_<part>.safetensors "
                      f"into {out.parent} (put them in ComfyUI/models/vae_approx); {out.name} holds "
                      f"both parts for taesd", stacklevel=3)
        written = []
        for part, sd in parts.items():
            path = out.parent / f"{v.name}_{part}.safetensors"
            _save_safetensors(sd, path, {**meta, "part": part, "target": "comfyui"})
            written.append(path)
        combined = {f"{part}.{k}": t for part, sd in parts.items() for k, t in sd.items()}
        _save_safetensors(combined, out, {**meta, "target": "comfyui"})
        return written + [out]
    tensors = LAYOUTS[Layout.COMFYUI].join(parts)
    if not extras or (v.normalization != "scale_shift" and comfyui.is_identity(extras)):
        extras = comfyui.scale_shift(v)
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


def cast_parts(parts: Parts, dtype: torch.dtype) -> Parts:
    """``parts`` in ``dtype``; a tensor that would overflow (become inf) or vanish (all non-zero
    values round to 0) is refused in one line naming it."""
    info, name = torch.finfo(dtype), str(dtype).replace("torch.", "")
    out: Parts = {}
    for part, sd in parts.items():
        out[part] = {}
        for k, t in sd.items():
            peak = float(t.abs().max()) if t.numel() else 0.0
            if peak > info.max:
                raise TaesdError(f"{part} tensor {k!r} holds values up to {peak:.4g}, beyond {name}'s "
                                 f"±{info.max:.6g}: refused (it would become inf); keep the weights' dtype "
                                 f"or use fp32 (nothing was written)")
            cast = t.to(dtype)
            if bool(t.ne(0).any()) and not bool(cast.ne(0).any()):
                raise TaesdError(f"{part} tensor {k!r} is below {name}'s smallest value and would become "
                                 f"all zeros: refused; keep the weights' dtype (nothing was written)")
            out[part][k] = cast
    return out


def state_dicts(model) -> Parts:
    """A loaded TAESD's parts as state dicts in original keys (for ``save_weights``)."""
    return {p: {k: t.detach().cpu() for k, t in getattr(model, p).state_dict().items()} for p in model.parts}
