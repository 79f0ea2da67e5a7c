"""``taesd.load``: a variant's published weights, found and checked, in a ready model."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .errors import TaesdError
from .model import TAESD
from .variants import Variant, get_variant
from .weights import PARTS, WeightSource, find_weights, load_part, read_source


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _normalize_parts(parts) -> tuple[str, ...]:
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise TaesdError(f"parts must be 'encoder', 'decoder' or both, not {parts!r}")
    return parts


def _resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16}
    if str(dtype).lower() not in names:
        raise TaesdError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    return names[str(dtype).lower()]


def load(variant: "str | Variant", weights=None, device=None, dtype=None, parts=None,
         revision: str | None = None, fast: bool = True, compile: bool = False,
         backend: str = "torch") -> TAESD:
    """Load a TAESD variant with its published weights.

    weights: None (look in $TAESD_WEIGHTS, then the Hugging Face hub), a file or folder, a list of
      files, or {"encoder": path, "decoder": path}. Any supported format; what a file holds is
      read from its tensor shapes.
    parts: "encoder", "decoder" or both (default: both, or what a single given file holds).
    revision: hub revision to pin (the published files were replaced in place between versions).
    fast: run the fast executor (taesd.fast: Winograd 3x3 convolutions, channels_last, fused oneDNN
      kernels, glibc allocator setting; docs/performance.md). False gives the plain published modules.
    compile: opt-in torch.compile of each part (first call per shape compiles).
    backend: "torch", or "onnxruntime" (chosen by itself when weights are exported .onnx files).
    """
    from .onnx_backend import load_onnxruntime, onnx_files
    if backend not in ("torch", "onnxruntime"):
        raise TaesdError(f"unknown backend {backend!r}; use 'torch' or 'onnxruntime'")
    if backend == "onnxruntime" or onnx_files(weights):
        return load_onnxruntime(variant, weights, device, dtype, parts, revision)
    v = get_variant(variant)
    sources: dict[Path, WeightSource] = {}
    per_part: dict[str, Path] = {}
    if isinstance(weights, (list, tuple)):
        for w in weights:
            src = read_source(w)
            sources[src.path] = src
            for p in src.parts:
                per_part.setdefault(p, src.path)
        if parts is None:
            parts = tuple(p for p in PARTS if p in per_part)
    elif isinstance(weights, (str, os.PathLike)) and Path(weights).is_file() and parts is None:
        src = read_source(weights)
        sources[src.path] = src
        parts = tuple(p for p in PARTS if p in src.parts)
    parts = _normalize_parts(PARTS if parts is None else parts)

    model = TAESD(v, parts)
    for part in parts:
        path = per_part.get(part)
        if path is None:
            if isinstance(weights, (list, tuple)):
                raise TaesdError(f"none of the given files holds the {v.name} {part}")
            path = find_weights(v, part, weights, revision)
        src = sources.get(path) or read_source(path)
        sources[path] = src
        sd, src = load_part(v, part, path, src)
        getattr(model, part).load_state_dict(sd)
        model.weights_info[part] = {"path": str(path), "format": src.format, "sha256": src.sha256}
        if src.extras:
            model.weights_info["vae_scale_shift"] = src.extras
    model.to(device=device if device is not None else default_device(), dtype=_resolve_dtype(dtype))
    model.eval().requires_grad_(False)
    if compile:
        from .fast import compile_model
        return compile_model(model)
    if fast:
        from .fast import fused_available, make_fast
        if model.device.type == "cpu" and model.dtype in (torch.bfloat16, torch.float16) \
                and not fused_available(torch.zeros(1, dtype=model.dtype)):
            warnings.warn(f"{str(model.dtype).removeprefix('torch.')} has no native kernels on this CPU (it needs "
                          "AVX-512 BF16/FP16, AMX or AVX-NE-CONVERT) and runs emulated, slower than the fp32 default",
                          stacklevel=2)
        return make_fast(model)
    return model
