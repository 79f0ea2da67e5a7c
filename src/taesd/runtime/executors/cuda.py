"""The CUDA executor ("cuda"; what "fast" means on a GPU): the same network, modules and weights,
run the way a GPU runs it fastest.

``CudaExecutor().apply(model)`` (or ``make_cuda(model)``) transforms a ``TAESD`` in place;
``taesd.load`` applies it by default on a CUDA device, and so do ``TaesdVAE``, ``use_taesd_vae``, the
preview callback, the CLI and ``taesd eval`` (all through ``taesd.runtime.executors.resolve``).

- precision: the dtype rule is ``taesd.runtime.dtypes.default_dtype``: fp16 on CUDA devices with
  tensor cores, fp32 elsewhere (fp32 convolutions then run as TF32, PyTorch's default for cuDNN).
- layout: weights in channels_last, so cuDNN runs NHWC tensor-core kernels without transposes.
- cuDNN autotuning: ``torch.backends.cudnn.benchmark = True`` (a process setting; ``TAESD_CUDNN_BENCHMARK=0``
  leaves it alone): the first call per shape times the algorithms and keeps the fastest.
- fusion: inside each residual ``Block`` conv+bias+ReLU and conv+bias+residual+ReLU run as cuDNN fused
  kernels (``torch.cudnn_convolution_relu`` / ``_add_relu``) where a probe on this device shows they work
  and agree with the unfused ops; otherwise in-place ReLU and add. The decoder's soft clamp
  ``tanh(x / 3) * 3`` runs in place (no temporaries).
- captured path: a part's whole forward for one (part, shape, dtype, device) is captured once as a CUDA
  graph and replayed (``cuda_graphs``): one launch instead of ~100. The result is a copy of the graph's
  output buffer unless ``copy_output=False`` (then the buffer itself, valid until the next call of
  that shape: for callers that consume it first). ``TAESD_CUDA_GRAPHS=0`` switches graphs off.

Every piece is device-agnostic Python around torch ops, so the eager path, the fusion fallbacks, the
cache policy (an injected capture function) and the memory planner (an injected ``mem_get_info``)
run and are tested on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from taesd import settings
from taesd.nn.layers import Block, Clamp
from taesd.runtime.executors.base import Executor, eager_only, swap, unswap, without_caches
from taesd.runtime.executors.cuda_graphs import (
    GRAPH_CAPACITY,
    GRAPH_REPEATS,
    GraphCache,
    GraphMemory,
    capture_cuda_graph,
    graphable,
)
from taesd.tiling import analyse, estimate_peak, pass_of

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


class CudaClamp(Clamp):
    """``tanh(x / 3) * 3`` in place on one temporary (the input is left alone); autograd, tracing
    and export get the plain forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if eager_only(x):
            return super().forward(x)
        return x.mul(1 / 3).tanh_().mul_(3)


class CudaBlock(Block):
    """A ``Block`` with fused cuDNN conv+ReLU / conv+add+ReLU where available, in-place ops elsewhere;
    autograd, tracing and export get the plain forward. Same submodules and state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if eager_only(x, self):
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
        return without_caches(super().__getstate__(), ("_graph_cache",))


# ---------------------------------------------------------------- the executor


def graph_bytes(model, part: str) -> Callable:
    """key, x -> estimated peak activation bytes of an untiled pass of ``part`` on ``x`` (what a
    captured graph's memory pool keeps): the tiling planner's estimate at x's element size."""

    def estimate(_key, x: torch.Tensor) -> int:
        an = analyse(model, part)
        return estimate_peak(an, pass_of(model, an, x))

    return estimate


# Module rewrite passes, ``rewrite(sequential) -> sequential``, applied to each part at apply time
# (before the class swap): sub-pixel upsample+conv, kernels of our own (cuda_kernels.py). A rewrite
# must share the original's Parameters (so state_dict, load_state_dict and .to() stay right) and
# return the module itself when it has nothing to do; undo puts the original back.
REWRITES: "list[Callable[[nn.Sequential], nn.Sequential]]" = []

TABLE = {Block: CudaBlock, Clamp: CudaClamp}
ROOT = {nn.Sequential: CudaSequential}
CACHES = ("fuse_cudnn", "_graph_cache", "_part")


@dataclasses.dataclass(frozen=True)
class CudaExecutor(Executor):
    """The CUDA executor (see the module docstring). ``graphs``: capture repeated shapes (None: on
    unless ``TAESD_CUDA_GRAPHS=0``); ``fuse``: the fused cuDNN kernels where they work; ``copy_output``:
    hand out a copy of a graph's output (False: the buffer itself); ``mem_get_info``/``capture``:
    injected for tests."""

    name = "cuda"
    graphs: "bool | None" = None
    fuse: bool = True
    capacity: int = GRAPH_CAPACITY
    repeats: int = GRAPH_REPEATS
    copy_output: bool = True
    mem_get_info: "Callable | None" = dataclasses.field(default=None, compare=False)
    capture: "Callable | None" = dataclasses.field(default=None, compare=False)

    def applies(self, model) -> bool:
        return model.device.type == "cuda"

    def transform(self, model) -> None:
        on_cuda = model.device.type == "cuda"
        if on_cuda and settings.cudnn_benchmark():
            torch.backends.cudnn.benchmark = True
        if model.dtype == torch.float32 and on_cuda and not torch.backends.cudnn.allow_tf32:
            warnings.warn("cuDNN TF32 is off: fp32 convolutions run at full fp32 rate", stacklevel=4)
        for part in model.parts:
            module = _rewritten(model, part)   # <- the rewrite passes (REWRITES) run here
            module.to(memory_format=torch.channels_last)
            swap(module, TABLE, ROOT)
            for sub in module.modules():
                if isinstance(sub, CudaBlock):
                    sub.__dict__["fuse_cudnn"] = self.fuse
            if isinstance(module, CudaSequential):
                module.__dict__["_part"] = part
                module.__dict__.pop("_graph_cache", None)
                if settings.cuda_graphs() if self.graphs is None else self.graphs:
                    module.__dict__["_graph_cache"] = self.graph_cache_for(model, part)

    def graph_cache_for(self, model, part: str) -> GraphCache:
        injected = self.capture is not None
        memory = GraphMemory(model.device, self.mem_get_info) \
            if (model.device.type == "cuda" or self.mem_get_info) else None
        return GraphCache(
            self.capture or functools.partial(capture_cuda_graph, copy_output=self.copy_output),
            capacity=self.capacity,
            repeats=self.repeats,
            nbytes=graph_bytes(model, part),
            budget=memory.budget if memory else None,
            devices=("cuda", model.device.type) if injected else ("cuda",),
        )

    def restore(self, model) -> None:
        for part in model.parts:
            module = model.part(part)
            unswap(module, TABLE, ROOT, CACHES)
            module.to(memory_format=torch.contiguous_format)
            original = module.__dict__.pop("_before_rewrite", None)
            if original is not None:
                setattr(model, part, original)


def _rewritten(model, part: str) -> nn.Module:
    """The part after every rewrite pass; the original is kept to put back on undo."""
    original = module = model.part(part)
    for rewrite in REWRITES:
        module = rewrite(module)
    if module is not original:
        module.__dict__["_before_rewrite"] = original
        setattr(model, part, module)
    return module


def make_cuda(model, graphs: "bool | None" = None, fuse: bool = True, capacity: int = GRAPH_CAPACITY,
              repeats: int = GRAPH_REPEATS, mem_get_info: "Callable | None" = None,
              capture: "Callable | None" = None, copy_output: bool = True):
    """``CudaExecutor(...).apply(model)``: the CUDA executor, in place (see ``CudaExecutor``)."""
    return CudaExecutor(graphs=graphs, fuse=fuse, capacity=capacity, repeats=repeats, copy_output=copy_output,
                        mem_get_info=mem_get_info, capture=capture).apply(model)


def graph_cache(model, part: str) -> "GraphCache | None":
    """The graph cache of ``model``'s ``part`` (None when graphs are off or another executor runs it)."""
    return model.part(part).__dict__.get("_graph_cache")


def make_plain(model):
    """Back to the plain modules: contiguous weights, captured graphs dropped."""
    return (getattr(model, "executor", None) or CudaExecutor()).undo(model)
