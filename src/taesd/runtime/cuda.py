"""The CUDA executor: the same network, modules and weights, run the way a GPU runs it fastest.

``make_cuda(model)`` transforms a ``TAESD`` on a CUDA device in place; ``taesd.load(..., device="cuda")``
applies it by default (executor "fast" on a GPU). What it does:

- precision: ``default_dtype`` is the loader's rule when no dtype is given: fp16 on CUDA devices with
  tensor cores (compute capability 7.0 and up), fp32 on older GPUs and on the CPU. bf16 and fp32 are
  there on request (fp32 convolutions then run as TF32, PyTorch's default for cuDNN).
- layout: weights in channels_last, so cuDNN runs NHWC tensor-core kernels without transposes.
- cuDNN autotuning: ``torch.backends.cudnn.benchmark = True`` (a process setting; ``TAESD_CUDNN_BENCHMARK=0``
  leaves it alone): the first call per shape times the algorithms and keeps the fastest.
- fusion: inside each residual ``Block`` conv+bias+ReLU and conv+bias+residual+ReLU run as cuDNN fused
  kernels (``torch.cudnn_convolution_relu`` / ``_add_relu``) where a probe on this device shows they work
  and agree with the unfused ops; otherwise in-place ReLU and add. The decoder's soft clamp
  ``tanh(x / 3) * 3`` runs in place (no temporaries).
- captured path: a part's whole forward for one (part, shape, dtype, device) is captured once as a CUDA
  graph and replayed: one launch instead of ~100, with static input and output buffers. A shape is
  captured only when it repeats (``GraphCache.repeats``; previews in a sampling loop hit the same
  shape every step), new shapes run eager. Captured graphs live in a small LRU (``capacity``) whose
  memory (each graph keeps its activation pool) is bounded by ``GraphMemory``: at most
  ``GRAPH_MEMORY_CAP`` bytes and a quarter of the device's free memory; shapes whose estimated peak
  (``taesd.tiling.estimate_peak``) does not fit run eager, where launch overhead is small
  against their work anyway. Graphs are used under ``torch.inference_mode`` (encode/decode) only;
  autograd, tracing and export get the eager modules. ``TAESD_CUDA_GRAPHS=0`` switches them off.

Every piece is device-agnostic Python around torch ops, so the eager path, the fusion fallbacks, the
cache policy (``GraphCache`` with an injected capture function) and the memory planner (an injected
``mem_get_info``) run and are tested on the CPU. Outputs are fresh tensors in the standard layout.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from taesd import tiling
from taesd.model import TAESD
from taesd.nn.layers import Block, Clamp
from taesd.runtime.dtypes import resolve_dtype

GRAPHS_ENV = "TAESD_CUDA_GRAPHS"
CUDNN_BENCHMARK_ENV = "TAESD_CUDNN_BENCHMARK"
TENSOR_CORE_CAPABILITY = (7, 0)  # Volta: the first GPUs with fp16 tensor cores
GRAPH_CAPACITY = 8  # captured shapes kept per part
GRAPH_REPEATS = 2  # a shape is captured on its second call
GRAPH_MEMORY_CAP = 4 << 30  # bytes all captured graphs of one cache may hold
GRAPH_MEMORY_FRACTION = 0.25  # ... and at most this share of the device's free memory
WARMUP_RUNS = 2  # eager runs before a capture: cuDNN picks its algorithms here


def _env_off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


# ---------------------------------------------------------------- precision and device rules


def default_dtype(device, dtype=None, capability: "tuple[int, int] | None" = None) -> torch.dtype:
    """The dtype a model on ``device`` runs in: ``dtype`` when given (a name or torch dtype), else
    fp16 on a CUDA device with tensor cores (``capability`` >= 7.0, read from the device unless given),
    else fp32."""
    if dtype is not None:
        return resolve_dtype(dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    return torch.float16 if tuple(capability) >= TENSOR_CORE_CAPABILITY else torch.float32


def is_cuda(model: TAESD) -> bool:
    return model.device.type == "cuda"


# ---------------------------------------------------------------- graph memory planner


class GraphMemory:
    """How many bytes captured graphs may hold on ``device``: ``min(cap, fraction x (free + held))``,
    where free comes from ``mem_get_info`` (``torch.cuda.mem_get_info`` unless injected: a function
    device -> (free, total) bytes) and held is what the cache's graphs hold already (theirs to give back)."""

    def __init__(
        self,
        device,
        mem_get_info: "Callable | None" = None,
        cap: int = GRAPH_MEMORY_CAP,
        fraction: float = GRAPH_MEMORY_FRACTION,
    ):
        self.device = torch.device(device)
        self.mem_get_info = mem_get_info or torch.cuda.mem_get_info
        self.cap, self.fraction = cap, fraction

    def budget(self, held: int = 0) -> int:
        free, _total = self.mem_get_info(self.device)
        return int(min(self.cap, self.fraction * (free + held)))


# ---------------------------------------------------------------- graph cache (pure policy)


@dataclass
class CacheStats:
    eager: int = 0  # calls run eager (first sight of a shape, too big, capture failed)
    captures: int = 0
    replays: int = 0
    evictions: int = 0
    failures: int = 0


@dataclass
class _Entry:
    runner: Callable
    nbytes: int


@dataclass
class GraphCache:
    """Which calls replay a captured graph, which run eager: the policy, free of CUDA.

    ``run(key, x, fn)``: a key seen fewer than ``repeats`` times runs ``fn(x)`` eager; on the
    ``repeats``-th call it is captured with ``capture(fn, x) -> runner`` (``runner(x)`` then replays),
    if its estimated bytes (``nbytes(key, x)``) fit the budget (``budget(held) -> bytes``), evicting the
    least recently used graphs to stay within ``capacity`` and the budget. A capture that raises marks
    the key eager for good. Keys of shapes seen once are remembered up to ``max_seen``."""

    capture: Callable
    capacity: int = GRAPH_CAPACITY
    repeats: int = GRAPH_REPEATS
    nbytes: "Callable | None" = None
    budget: "Callable | None" = None
    max_seen: int = 256
    devices: tuple = ("cuda",)  # device types whose calls may be captured
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self):
        self._entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
        self._seen: "OrderedDict[tuple, int]" = OrderedDict()
        self._eager_only: "OrderedDict[tuple, str]" = OrderedDict()

    @property
    def keys(self) -> list:
        """Captured keys, least recently used first."""
        return list(self._entries)

    @property
    def held_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def why_eager(self, key) -> "str | None":
        return self._eager_only.get(key)

    def clear(self) -> None:
        self._entries.clear()
        self._seen.clear()
        self._eager_only.clear()

    def run(self, key, x, fn: Callable):
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.stats.replays += 1
            return entry.runner(x)
        if key in self._eager_only or self._count(key) < self.repeats:
            self.stats.eager += 1
            return fn(x)
        return self._capture(key, x, fn)

    def _count(self, key) -> int:
        n = self._seen.pop(key, 0) + 1
        self._seen[key] = n
        while len(self._seen) > self.max_seen:
            self._seen.popitem(last=False)
        return n

    def _mark_eager(self, key, why: str) -> None:
        self._eager_only[key] = why
        while len(self._eager_only) > self.max_seen:
            self._eager_only.popitem(last=False)

    def _capture(self, key, x, fn: Callable):
        size = int(self.nbytes(key, x)) if self.nbytes else 0
        limit = self.budget(self.held_bytes) if self.budget else None
        if limit is not None and size > limit:
            self._mark_eager(
                key, f"needs ~{size / 2**20:.0f} MiB, over the graph memory budget of {limit / 2**20:.0f} MiB"
            )
            self.stats.eager += 1
            return fn(x)
        while self._entries and (
            len(self._entries) >= self.capacity or (limit is not None and self.held_bytes + size > limit)
        ):
            self._entries.popitem(last=False)
            self.stats.evictions += 1
        try:
            runner = self.capture(fn, x)
        except RuntimeError as e:  # capture refused (an op that cannot be captured, ...): eager
            self._mark_eager(key, f"capture failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            self.stats.failures += 1
            self.stats.eager += 1
            return fn(x)
        self._entries[key] = _Entry(runner, size)
        self.stats.captures += 1
        return runner(x)


# ---------------------------------------------------------------- CUDA graph capture


class CapturedRun:
    """One captured forward: copy the input into the static buffer, replay, hand out a copy of the
    static output (the next replay overwrites it) in the standard layout."""

    def __init__(self, graph, static_in: torch.Tensor, static_out: torch.Tensor):
        self.graph, self.static_in, self.static_out = graph, static_in, static_out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out.clone(memory_format=torch.contiguous_format)


def static_like(x: torch.Tensor) -> torch.Tensor:
    """The static input buffer: ``x``'s shape and dtype, channels_last for image-shaped tensors."""
    fmt = torch.channels_last if x.dim() == 4 else torch.contiguous_format
    return torch.empty_like(x, memory_format=fmt).copy_(x)


def capture_cuda_graph(fn: Callable, x: torch.Tensor) -> CapturedRun:
    """Warm ``fn`` up on a side stream (cuDNN autotuning happens here, not inside the capture), then
    capture one call on a static copy of ``x`` into a CUDA graph with its own memory pool."""
    static_in = static_like(x)
    current = torch.cuda.current_stream(x.device)
    side = torch.cuda.Stream(device=x.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            fn(static_in)
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in)
    return CapturedRun(graph, static_in, static_out)


def graphable(x: torch.Tensor, devices: tuple = ("cuda",)) -> bool:
    """Whether a call may use a captured graph: a tensor on ``devices`` (CUDA) under inference mode,
    not traced, exported or compiled (those need the modules)."""
    return (
        x.device.type in devices
        and torch.is_inference_mode_enabled()
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
    )


# ---------------------------------------------------------------- fused cuDNN kernels

_fusion_ok: dict[tuple, bool] = {}  # (device, dtype) -> do the fused cuDNN kernels work here?


def _conv_args(conv: nn.Conv2d) -> tuple:
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def fusion_available(x: torch.Tensor) -> bool:
    """cuDNN's fused conv+bias+ReLU and conv+bias+add+ReLU run on ``x``'s device and dtype and agree
    with the unfused ops (probed once per device and dtype on a small input)."""
    if not x.is_cuda:
        return False
    key = (x.device, x.dtype)
    if key not in _fusion_ok:
        _fusion_ok[key] = _probe_fusion(x.device, x.dtype)
    return _fusion_ok[key]


def _probe_fusion(device: torch.device, dtype: torch.dtype) -> bool:
    with torch.inference_mode():
        gen = torch.Generator(device="cpu").manual_seed(0)
        conv = nn.Conv2d(16, 16, 3, padding=1)
        conv.weight.data = torch.randn(conv.weight.shape, generator=gen) * 0.1
        conv = conv.to(device=device, dtype=dtype, memory_format=torch.channels_last)
        x = torch.randn(2, 16, 12, 12, generator=gen).to(device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        try:
            fused = torch.cudnn_convolution_add_relu(x, conv.weight, x, None, conv.bias, *_conv_args(conv))
            fused_relu = torch.cudnn_convolution_relu(x, conv.weight, conv.bias, *_conv_args(conv))
        except (RuntimeError, NotImplementedError):
            return False
        ref = conv(x)
        tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3
        return bool(
            torch.allclose(fused.float(), (ref + x).relu().float(), atol=tol, rtol=tol)
            and torch.allclose(fused_relu.float(), ref.relu().float(), atol=tol, rtol=tol)
        )


def _conv_relu(conv: nn.Conv2d, x: torch.Tensor, fused: bool) -> torch.Tensor:
    if fused:
        return torch.cudnn_convolution_relu(x, conv.weight, conv.bias, *_conv_args(conv))
    return F.relu(conv(x), inplace=True)


def _conv_add_relu(conv: nn.Conv2d, x: torch.Tensor, other: torch.Tensor, fused: bool) -> torch.Tensor:
    if fused:
        return torch.cudnn_convolution_add_relu(x, conv.weight, other, None, conv.bias, *_conv_args(conv))
    return conv(x).add_(other).relu_()


# ---------------------------------------------------------------- modules


def _autograd(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether this call records a graph for backward (in-place shortcuts would break it)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


class CudaClamp(Clamp):
    """``tanh(x / 3) * 3`` in place on one temporary (the input is left alone); autograd gets the
    plain forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)
        return x.mul(1 / 3).tanh_().mul_(3)


class CudaBlock(Block):
    """A ``Block`` with fused cuDNN conv+ReLU / conv+add+ReLU where available, in-place ops elsewhere;
    autograd gets the plain forward. Same submodules and state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _autograd(x, self):
            return super().forward(x)
        if self.pool is not None:
            x = x + self.pool(x)
        if self.__dict__.get("fuse_cudnn", True) and fusion_available(x):
            try:
                return self._body(x.contiguous(memory_format=torch.channels_last), fused=True)
            except RuntimeError:
                # A shape the probe did not cover may have no fused cuDNN engine: unfused from now on.
                self.__dict__["fuse_cudnn"] = False
        return self._body(x, fused=False)

    def _body(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        body = self.conv
        h = _conv_relu(body[2], _conv_relu(body[0], x, fused), fused)
        return _conv_add_relu(body[4], h, self.skip(x), fused)


class CudaSequential(nn.Sequential):
    """``nn.Sequential`` whose whole forward replays a captured CUDA graph for repeated shapes
    (``GraphCache``); otherwise (new shapes, slices made by tiling, autograd) it runs layer by layer."""

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.__dict__.get("_graph_cache")
        if cache is None or not graphable(x, cache.devices):
            return self.eager(x).contiguous()
        key = (self.__dict__.get("_part"), tuple(x.shape), x.dtype, x.device)
        return cache.run(key, x, self.eager).contiguous()

    def __getstate__(self):  # copies and pickles carry no captured graph
        state = super().__getstate__()
        state.pop("_graph_cache", None)
        return state


# ---------------------------------------------------------------- transforming a model


def graph_bytes(model: TAESD, part: str) -> Callable:
    """key, x -> estimated peak activation bytes of an untiled pass of ``part`` on ``x`` (what a
    captured graph's memory pool keeps): the tiling planner's estimate at x's element size."""

    def estimate(_key, x: torch.Tensor) -> int:
        an = tiling.analyse(model, part)
        return tiling.estimate_peak(an, tiling.pass_of(model, an, x))

    return estimate


def make_cuda(
    model: TAESD,
    graphs: "bool | None" = None,
    fuse: bool = True,
    capacity: int = GRAPH_CAPACITY,
    repeats: int = GRAPH_REPEATS,
    mem_get_info: "Callable | None" = None,
    capture: "Callable | None" = None,
) -> TAESD:
    """Transform ``model`` in place for GPU inference and return it (see the module docstring).
    ``graphs``: capture repeated shapes (default: on unless ``TAESD_CUDA_GRAPHS=0``); ``fuse``: use
    the fused cuDNN kernels where they work; ``mem_get_info``/``capture``: injected for tests."""
    if graphs is None:
        graphs = not _env_off(GRAPHS_ENV)
    if is_cuda(model) and not _env_off(CUDNN_BENCHMARK_ENV):
        torch.backends.cudnn.benchmark = True
    if model.dtype == torch.float32 and is_cuda(model) and not torch.backends.cudnn.allow_tf32:
        warnings.warn("cuDNN TF32 is off: fp32 convolutions run at full fp32 rate", stacklevel=2)
    for part in model.parts:
        module = model.part(part)
        module.to(memory_format=torch.channels_last)
        if type(module) is nn.Sequential:
            module.__class__ = CudaSequential
        for sub in module.modules():  # same attributes, new forward
            if type(sub) is Block:
                sub.__class__ = CudaBlock
            elif type(sub) is Clamp:
                sub.__class__ = CudaClamp
            if isinstance(sub, CudaBlock):
                sub.__dict__["fuse_cudnn"] = fuse
        if isinstance(module, CudaSequential):
            module.__dict__["_part"] = part
            module.__dict__.pop("_graph_cache", None)
            if graphs:
                memory = GraphMemory(model.device, mem_get_info) if (is_cuda(model) or mem_get_info) else None
                module.__dict__["_graph_cache"] = GraphCache(
                    capture or capture_cuda_graph,
                    capacity=capacity,
                    repeats=repeats,
                    nbytes=graph_bytes(model, part),
                    budget=memory.budget if memory else None,
                    devices=("cuda",) if capture is None else ("cuda", model.device.type),
                )
    return model


def graph_cache(model: TAESD, part: str) -> "GraphCache | None":
    """The graph cache of ``model``'s ``part`` (None when graphs are off or the model is not made by
    ``make_cuda``)."""
    return model.part(part).__dict__.get("_graph_cache")


def make_plain(model: TAESD) -> TAESD:
    """Undo ``make_cuda``: plain modules and contiguous weights; captured graphs are dropped."""
    for part in model.parts:
        module = model.part(part)
        for sub in module.modules():
            if type(sub) is CudaBlock:
                sub.__dict__.pop("fuse_cudnn", None)
                sub.__class__ = Block
            elif type(sub) is CudaClamp:
                sub.__class__ = Clamp
            elif type(sub) is CudaSequential:
                sub.__dict__.pop("_graph_cache", None)
                sub.__dict__.pop("_part", None)
                sub.__class__ = nn.Sequential
        module.to(memory_format=torch.contiguous_format)
    return model
