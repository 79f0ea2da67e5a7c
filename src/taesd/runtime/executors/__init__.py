"""Executors: how a ``TAESD``'s modules run, never what they compute. One file per executor, one
table, and one ``resolve`` that every entry point calls (``taesd.load``, ``TaesdVAE``,
``use_taesd_vae``, the preview callback, the CLI, ``taesd eval``), so they all agree.

    "fast" (or None)  the device's fast executor: "cuda" on a CUDA device, "cpu" elsewhere
    "cpu"             Winograd / oneDNN, channels_last, fused kernels (cpu.py, docs/performance.md)
    "cuda"            fp16 channels_last, fused cuDNN kernels, CUDA graphs (cuda.py, docs/gpu.md)
    "plain"           the published modules as they are
    "compile"         torch.compile per part
    "onnxruntime"     ONNX Runtime sessions (returns a new model; docs/onnx.md)

A new executor is one file with an ``Executor`` subclass plus one line in ``EXECUTORS``.
"""
from __future__ import annotations

import dataclasses

import torch

from taesd.errors import TaesdError
from taesd.runtime.executors.base import FAST, Executor
from taesd.runtime.executors.compile import CompileExecutor
from taesd.runtime.executors.cpu import CpuExecutor
from taesd.runtime.executors.cuda import CudaExecutor
from taesd.runtime.executors.onnxruntime import OnnxRuntimeExecutor
from taesd.runtime.executors.plain import PlainExecutor

EXECUTORS: "dict[str, type[Executor]]" = {
    "cpu": CpuExecutor,
    "cuda": CudaExecutor,
    "plain": PlainExecutor,
    "compile": CompileExecutor,
    "onnxruntime": OnnxRuntimeExecutor,
}
NAMES = ("fast", *EXECUTORS)   # what users may type
# What "fast" (or no choice) is on each device type; anything else gets the CPU executor (whose
# modules fall back to the plain forward off the CPU). Tests inject fakes here.
FAST.update(cuda=CudaExecutor, cpu=CpuExecutor)


def resolve(name: "str | Executor | None", device=None) -> Executor:
    """The executor for ``name`` on ``device`` (None: the CPU). An ``Executor`` is returned as it is
    (that is how options such as ``CudaExecutor(copy_output=False)`` are passed)."""
    if isinstance(name, Executor):
        return name
    device = torch.device("cpu" if device is None else device)
    if name is None or name == "fast":
        return Executor(auto=True).for_device(device)
    if name not in EXECUTORS:
        raise TaesdError(f"unknown executor {name!r}; use one of: {', '.join(NAMES)}")
    if name == "onnxruntime":
        return OnnxRuntimeExecutor(device=None if device.type == "cpu" else str(device))
    return EXECUTORS[name]()


def exact_if_asked(executor: Executor, dtype) -> Executor:
    """An explicit dtype is the one computed in: the CPU executor's automatic bf16 (AMX) is off."""
    if dtype is not None and isinstance(executor, CpuExecutor) and executor.bf16 is None:
        return dataclasses.replace(executor, bf16=False)
    return executor


def follow(executor: "Executor | None", device) -> "Executor | None":
    """The executor a model moved to ``device`` gets (None stays None): ``Executor.for_device``."""
    return None if executor is None else executor.for_device(device)


__all__ = ["EXECUTORS", "FAST", "NAMES", "CompileExecutor", "CpuExecutor", "CudaExecutor", "Executor",
           "OnnxRuntimeExecutor", "PlainExecutor", "exact_if_asked", "follow", "resolve"]
