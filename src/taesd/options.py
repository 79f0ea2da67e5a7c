"""The options of a load, resolved once at the edge into one typed record (``LoadOptions``); below
the edge everything takes typed values. The old switches (``fast=``, ``compile=``, ``backend=``) map
to ``executor=`` here, with a ``DeprecationWarning`` (``legacy_switches``)."""
from __future__ import annotations

import dataclasses
import functools
import warnings

import torch

from taesd.errors import TaesdError
from taesd.registry import Variant, get_variant, normalize_parts
from taesd.runtime.dtypes import default_dtype
from taesd.runtime.executors import Executor, OnnxRuntimeExecutor, exact_if_asked, resolve


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """What ``taesd.load`` was asked for, every default decided: the variant record, the weights as
    given (None, a path, a list or a part -> path dict), the device, the dtype (``default_dtype``),
    the parts (None: what the weights hold, else both), the executor (``executors.resolve``)."""

    variant: Variant
    weights: object
    device: torch.device
    dtype: torch.dtype
    parts: "tuple[str, ...] | None"
    executor: Executor
    revision: "str | None" = None
    source: "str | None" = None

    @classmethod
    def resolve(cls, variant, weights=None, device=None, dtype=None, parts=None, executor=None,
                revision: "str | None" = None, source: "str | None" = None) -> "LoadOptions":
        if executor is None and mentions_onnx(weights):
            executor = "onnxruntime"   # exported files run where they were made for
        onnx = executor == "onnxruntime" or isinstance(executor, OnnxRuntimeExecutor)
        if device is None:   # ONNX Runtime computes on the CPU unless a device is asked for
            device = torch.device("cpu") if onnx else default_device()
        device = torch.device(device)
        return cls(get_variant(variant), weights, device, default_dtype(device, dtype),
                   None if parts is None else normalize_parts(parts),
                   exact_if_asked(resolve(executor, device), dtype), revision, source)


def mentions_onnx(weights) -> bool:
    """The weights name exported .onnx files."""
    if weights is None:
        return False
    items = weights.values() if isinstance(weights, dict) else (
        weights if isinstance(weights, (list, tuple)) else [weights])
    return any(str(p).endswith(".onnx") for p in items)


def executor_from_switches(executor, fast=None, compile=None, backend=None):
    """``executor=`` from the old switches (an explicit ``executor`` wins)."""
    if backend is not None and backend not in ("torch", "onnxruntime"):
        raise TaesdError(f"unknown backend {backend!r}; use executor='onnxruntime' (or 'fast', 'plain')")
    if executor is not None:
        return executor
    if backend == "onnxruntime":
        return "onnxruntime"
    if compile:
        return "compile"
    return "plain" if fast is False else None


def legacy_switches(fn):
    """Accept ``fast=``, ``compile=`` and ``backend=`` as keywords of ``fn``, mapped to ``executor=``,
    with one ``DeprecationWarning`` per call naming the new spelling."""

    @functools.wraps(fn)
    def wrapper(*args, fast=None, compile=None, backend=None, **kwargs):
        switches = (("fast", fast), ("compile", compile), ("backend", backend))
        given = {k: v for k, v in switches if v is not None}
        if given:
            kwargs["executor"] = executor_from_switches(kwargs.get("executor"), fast, compile, backend)
            old = ", ".join(f"{k}={v!r}" for k, v in given.items())
            new = kwargs["executor"] or "fast"
            warnings.warn(f"{fn.__name__}({old}) is deprecated; use executor={new!r}",
                          DeprecationWarning, stacklevel=2)
        return fn(*args, **kwargs)

    return wrapper
