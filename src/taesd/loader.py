"""``taesd.load``: a variant's published weights, found and checked, in a ready model.

Three steps, each a function: ``resolve`` (which file holds each part), ``build`` (the network with
those weights), ``with_executor`` (how it runs: the fast CPU path, the plain modules, torch.compile
or ONNX Runtime). The loader is the only module that picks an executor.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from taesd.errors import TaesdError
from taesd.io.weights.formats import WeightSource, read_source
from taesd.io.weights.resolve import find_weights, load_part
from taesd.model import TAESD
from taesd.registry import PARTS, Variant, get_variant, normalize_parts
from taesd.runtime import cuda as cuda_executor
from taesd.runtime import fast as fast_executor
from taesd.runtime.devices import check_device
from taesd.runtime.dtypes import resolve_dtype

EXECUTORS = ("fast", "plain", "compile", "onnxruntime")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(variant: str | Variant, weights=None, device=None, dtype=None, parts=None,
         revision: str | None = None, fast: bool = True, compile: bool = False,
         backend: str = "torch", executor: str | None = None, source: str | None = None) -> TAESD:
    """Load a TAESD variant with its published weights.

    Args:
      variant: a registry name ("taef2") or a ``Variant``.
      weights: None ($TAESD_WEIGHTS, then the download cache, then a verified download from the
        variant's published sources: the Hugging Face hub, GitHub), a file or folder, a list of
        files, or {"encoder": path, "decoder": path}. Any supported format; what a file holds is
        read from its tensor shapes. Exported .onnx files select the onnxruntime executor.
      parts: "encoder", "decoder" or both (default: both, or what the given files hold).
      revision: revision to pin (a hub commit, or a GitHub commit with source="github"): the published
        files were replaced in place between versions.
      source: "hub" or "github": download only from there (default: the registry's order).
      device: default "cuda" when a GPU is visible, else "cpu".
      dtype: "fp32", "fp16", "bf16" or a torch dtype. Default (None): fp16 on a CUDA GPU with tensor
        cores (compute capability 7.0+), fp32 on older GPUs and on the CPU
        (``taesd.runtime.cuda.default_dtype``). Ask for dtype="fp32" to get fp32 on a GPU.
      executor: "fast" (default; on the CPU: Winograd 3x3 convolutions, channels_last, fused oneDNN
        kernels, glibc allocator setting, docs/performance.md; on CUDA: the CUDA executor, fp16,
        channels_last, cuDNN autotuning and fused kernels, CUDA graphs for repeated shapes,
        docs/gpu.md), "plain" (the published modules as they are),
        "compile" (torch.compile per part; the first call per shape compiles) or "onnxruntime".
      fast, compile, backend: the older switches for the same choice (fast=False is "plain",
        compile=True is "compile", backend="onnxruntime" is "onnxruntime").

    Example:
      >>> model = taesd.load("taef2", dtype="fp32")
      >>> images = model.decode(latents)
    """
    check_device(device)   # one line for a device this machine lacks, before any weight is read
    executor = _executor(executor, fast, compile, backend, weights)
    if executor == "onnxruntime":
        return _load_onnxruntime(variant, weights, device, dtype, parts, revision, source)
    v = get_variant(variant)
    sources = resolve(v, weights, parts, revision, source)
    model = build(v, sources)
    device = torch.device(device) if device is not None else default_device()
    model.to(device=device, dtype=cuda_executor.default_dtype(device, dtype))
    model.eval().requires_grad_(False)
    return with_executor(model, executor)


def _executor(executor, fast, compile, backend, weights) -> str:
    if backend not in ("torch", "onnxruntime"):
        raise TaesdError(f"unknown backend {backend!r}; use 'torch' or 'onnxruntime'")
    if executor is None:
        onnx = backend == "onnxruntime" or _mentions_onnx(weights)
        executor = "onnxruntime" if onnx else "compile" if compile else "fast" if fast else "plain"
    if executor not in EXECUTORS:
        raise TaesdError(f"unknown executor {executor!r}; use one of: {', '.join(EXECUTORS)}")
    return executor


def _mentions_onnx(weights) -> bool:
    if weights is None:
        return False
    if isinstance(weights, dict):
        items = weights.values()
    else:
        items = weights if isinstance(weights, (list, tuple)) else [weights]
    return any(str(p).endswith(".onnx") for p in items)


def resolve(v: Variant, weights=None, parts=None, revision: str | None = None,
            source: str | None = None) -> dict[str, WeightSource]:
    """{part: the read WeightSource holding it}: explicit weights -> $TAESD_WEIGHTS -> cache -> download."""
    given: dict[str, WeightSource] = {}
    if isinstance(weights, (list, tuple)):
        for w in weights:
            src = read_source(w)
            for p in src.parts:
                given.setdefault(p, src)
        if parts is None:
            parts = tuple(p for p in PARTS if p in given)
    elif isinstance(weights, (str, os.PathLike)) and Path(weights).is_file() and parts is None:
        src = read_source(weights)
        given = dict.fromkeys(src.parts, src)
        parts = tuple(p for p in PARTS if p in src.parts)
    parts = normalize_parts(PARTS if parts is None else parts)
    by_path: dict[Path, WeightSource] = {s.path: s for s in given.values()}
    out: dict[str, WeightSource] = {}
    for part in parts:
        if part in given:
            out[part] = given[part]
            continue
        if isinstance(weights, (list, tuple)):
            raise TaesdError(f"none of the given files holds the {v.name} {part}")
        path = find_weights(v, part, weights, revision, source)
        out[part] = by_path.setdefault(path, read_source(path))
    return out


def build(v: Variant, sources: dict[str, WeightSource]) -> TAESD:
    """The network of ``v`` with each part's weights, checked against the variant's shapes."""
    model = TAESD(v, tuple(sources))
    for part, src in sources.items():
        sd, _ = load_part(v, part, src.path, src)
        model.part(part).load_state_dict(sd)
        model.weights_info[part] = {"path": str(src.path), "format": src.format, "sha256": src.sha256}
        if src.extras:
            model.weights_info["vae_scale_shift"] = src.extras
    return model


def with_executor(model: TAESD, executor: str) -> TAESD:
    """``model`` set up to run with ``executor`` ("fast", "plain" or "compile"); "fast" is the CUDA
    executor when the model is on a CUDA device, the CPU fast executor elsewhere."""
    if executor == "compile":
        return fast_executor.compile_model(model)
    if executor == "plain":
        return model
    if model.device.type == "cuda":
        return cuda_executor.make_cuda(model)
    if model.device.type == "cpu" and model.dtype in (torch.bfloat16, torch.float16) \
            and not fast_executor.fused_available(torch.zeros(1, dtype=model.dtype)):
        name = str(model.dtype).removeprefix("torch.")
        warnings.warn(f"{name} has no native kernels on this CPU (it needs AVX-512 BF16/FP16, AMX or "
                      "AVX-NE-CONVERT) and runs emulated, slower than the fp32 default",
                      stacklevel=3)
    return fast_executor.make_fast(model)


def _load_onnxruntime(variant, weights, device, dtype, parts, revision, source=None):
    """Exported .onnx files as they are, or the torch weights exported in memory (fp16 export when
    dtype is fp16, else fp32)."""
    from taesd.runtime import onnx_runtime  # onnx and onnxruntime are optional: imported when asked
    onnx_paths = onnx_runtime.onnx_files(weights)
    if onnx_paths:
        return onnx_runtime.from_onnx_files(variant, onnx_paths, device, parts)
    fp16 = {torch.float32: False, torch.float16: True}.get(resolve_dtype(dtype))
    if fp16 is None:
        raise TaesdError("onnxruntime runs fp32 or fp16 exports; use --dtype fp32 or fp16")
    onnx_runtime.providers_for(device)   # a missing provider fails before the export
    torch_model = load(variant, weights, device="cpu", dtype="fp32", parts=parts, revision=revision,
                       executor="plain", source=source)
    return onnx_runtime.from_torch(torch_model, fp16=fp16, device=device)
