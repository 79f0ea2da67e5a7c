"""What every executor is: a way to run a ``TAESD``'s own modules (same weights, same state_dict),
switched on with ``apply`` and off with ``undo``, and the two questions tiling may ask of it.

An executor transforms a model in place by swapping module classes (``swap``: a subclass with
the same attributes and another ``forward``), never what the network computes. It records itself
as ``model.executor`` (None: the plain modules). Executors are small records of their options:
picklable, comparable, holding no per-model state (caches live on the modules they made).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from taesd import settings

TAESD = nn.Module   # a taesd.model.TAESD (not imported: executors sit above the model, this file below)

# What "fast" (or no choice) is per device type, filled by taesd.runtime.executors (which imports the
# executors); a device type not listed gets the "cpu" entry. Tests inject fakes here.
FAST: dict = {}


@dataclasses.dataclass(frozen=True)
class Executor:
    """The base of every executor; by itself it changes nothing (``plain.PlainExecutor``)."""

    name = ""
    layerwise = True   # tiling may run the part's layers one by one (False: the part as a whole)
    # Chosen for the device ("fast" / no choice): a model moved elsewhere gets that device's executor.
    auto: bool = dataclasses.field(default=False, kw_only=True)

    def applies(self, model: TAESD) -> bool:
        """Whether this executor does anything for ``model`` (its device and dtype)."""
        return True

    def apply(self, model: TAESD) -> TAESD:
        """Set ``model`` up to run with this executor (in place; undoes any other first)."""
        previous = getattr(model, "executor", None)
        if previous is not None:
            previous.undo(model)
        self.transform(model)
        model.executor = self
        return model

    def undo(self, model: TAESD) -> TAESD:
        """Back to the plain modules (process settings such as the allocator stay)."""
        self.restore(model)
        model.executor = None
        return model

    def transform(self, model: TAESD) -> None:
        """The executor's own work (the plain executor has none)."""

    def restore(self, model: TAESD) -> None:
        """Undo ``transform``."""

    def for_device(self, device) -> "Executor":
        """The executor a model moved to ``device`` gets: the device's own (``FAST``) when this one
        was chosen for its device ("fast"), else this one."""
        if not self.auto:
            return self
        fast = FAST.get(torch.device(device).type, FAST["cpu"])
        return self if type(self) is fast else fast(auto=True)   # same kind: its options stay

    def compute_dtype(self, model: TAESD) -> torch.dtype:
        """The dtype ``model``'s layers compute in; its inputs and outputs stay ``model.dtype``
        (the CPU executor computes an fp32 model in bf16 on CPUs with native bf16, AMX or
        AVX-512-BF16, as OpenVINO does)."""
        return model.dtype

    def tile_alignment(self, conv: nn.Module) -> int:
        """The output tile size this executor computes ``conv`` in (a Winograd F(m x m, 3x3) tile
        rounds as a whole, so tiles must start on its grid); 0 or 1: no constraint."""
        return 0

    @property
    def memory_overhead(self) -> float:
        """Peak memory over the activations tiling counts (docs/tiling.md, measured)."""
        return settings.tile_overhead(direct=True)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({fields})"


def swap(module: nn.Module, table: dict, root: dict | None = None) -> None:
    """The one class-swap loop: every submodule of ``module`` whose exact class is a key of
    ``table`` (``module`` itself: of ``root``) becomes that value, a subclass with the same
    attributes and state_dict."""
    for sub in module.modules():
        new = ((root or {}) if sub is module else table).get(type(sub))
        if new is not None:
            sub.__class__ = new


def unswap(module: nn.Module, table: dict, root: dict | None = None, caches: tuple = ()) -> None:
    """Undo ``swap``: back to the plain classes, dropping the ``caches`` entries of each module's
    ``__dict__`` (packed weights, captured graphs, flags)."""
    back = {new: old for old, new in [*table.items(), *(root or {}).items()]}
    for sub in module.modules():
        old = back.get(type(sub))
        if old is not None:
            for key in caches:
                sub.__dict__.pop(key, None)
            sub.__class__ = old


def without_caches(state: dict, caches: tuple) -> dict:
    """A module's ``__getstate__`` minus the cache entries (copies and pickles carry none)."""
    for key in caches:
        state.pop(key, None)
    return state


def tracing() -> bool:
    """Tracing, ONNX export or torch.compile is looking: they need the plain, standard-op graph."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def records_autograd(x: torch.Tensor, module: nn.Module | None = None) -> bool:
    """This call records a graph for backward (fused and in-place shortcuts would break it)."""
    return torch.is_grad_enabled() and (x.requires_grad or (
        module is not None and any(p.requires_grad for p in module.parameters())))


def eager_only(x: torch.Tensor, module: nn.Module | None = None) -> bool:
    """The one gate of every executor: autograd, tracing, export and compile get the plain forward."""
    return tracing() or records_autograd(x, module)
