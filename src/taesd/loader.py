"""``taesd.load``: a variant's published weights, found and checked, in a ready model.

The options are resolved once (``taesd.options.LoadOptions``), then three steps, each a function:
``resolve`` (which file holds each part), ``build`` (the network with those weights), and the
executor's ``apply`` (how it runs: ``taesd.runtime.executors``).
"""
from __future__ import annotations

import dataclasses

import torch

from taesd.errors import TaesdError
from taesd.io.weights.read import WeightSource
from taesd.io.weights.resolve import load_part, resolve  # noqa: F401  (the one resolver)
from taesd.model import TAESD
from taesd.options import LoadOptions, default_device, legacy_switches
from taesd.registry import Variant
from taesd.runtime import executors
from taesd.runtime.devices import check_device
from taesd.runtime.executors.plain import PlainExecutor

__all__ = ["LoadOptions", "build", "default_device", "load", "load_with", "resolve", "with_executor"]


@legacy_switches
def load(variant: str | Variant, weights=None, device=None, dtype=None, parts=None,
         revision: str | None = None, *, executor=None, source: str | None = None) -> TAESD:
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
        (``taesd.runtime.dtypes.default_dtype``). Ask for dtype="fp32" to get fp32 on a GPU.
      executor: "fast" (default: "cuda" on a CUDA device, "cpu" elsewhere), "cpu" (Winograd 3x3
        convolutions, channels_last, fused oneDNN kernels, glibc allocator setting,
        docs/performance.md), "cuda" (channels_last, cuDNN autotuning and fused kernels, CUDA graphs
        for repeated shapes, docs/gpu.md), "plain" (the published modules as they are), "compile"
        (torch.compile per part; the first call per shape compiles), "onnxruntime", or an
        ``Executor`` with options (``CudaExecutor(copy_output=False)``).
      fast, compile, backend: deprecated spellings of ``executor`` (fast=False is "plain",
        compile=True is "compile", backend="onnxruntime" is "onnxruntime").

    Example:
      >>> model = taesd.load("taef2", dtype="fp32")
      >>> images = model.decode(latents)
    """
    check_device(device)   # one line for a device this machine lacks, before any weight is read
    return load_with(LoadOptions.resolve(variant, weights, device, dtype, parts, executor, revision, source))


def load_with(opts: LoadOptions) -> TAESD:
    """``load`` from resolved options."""
    if opts.executor.name == "onnxruntime":
        return _load_onnxruntime(opts)
    sources = resolve(opts.variant, opts.weights, opts.parts, opts.revision, opts.source)
    model = build(opts.variant, sources)
    model.to(device=opts.device, dtype=opts.dtype)
    model.eval().requires_grad_(False)
    return opts.executor.apply(model)


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


def with_executor(model: TAESD, executor="fast") -> TAESD:
    """``model`` set up to run with ``executor`` (a name or an ``Executor``), resolved for its device."""
    return executors.resolve(executor, model.device).apply(model)


def _load_onnxruntime(opts: LoadOptions):
    """Exported .onnx files as they are, or the torch weights exported in memory (fp16 export when
    dtype is fp16, else fp32)."""
    from taesd.runtime.executors import onnxruntime  # onnx and onnxruntime are imported when asked
    device = opts.executor.device
    onnx_paths = onnxruntime.onnx_files(opts.weights)
    if onnx_paths:
        return onnxruntime.from_onnx_files(opts.variant, onnx_paths, device, opts.parts)
    fp16 = {torch.float32: False, torch.float16: True}.get(opts.dtype)
    if fp16 is None:
        raise TaesdError("onnxruntime runs fp32 or fp16 exports; use --dtype fp32 or fp16")
    onnxruntime.providers_for(device)   # a missing provider fails before the export
    plain = dataclasses.replace(opts, device=torch.device("cpu"), dtype=torch.float32,
                                executor=PlainExecutor())
    return onnxruntime.from_torch(load_with(plain), fp16=fp16, device=device)
