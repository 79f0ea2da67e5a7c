"""CUDA graphs for the CUDA executor: which calls replay a captured graph (``GraphCache``, a policy
free of CUDA, tested on the CPU with an injected capture), how much memory graphs may hold
(``GraphMemory``, an injected ``mem_get_info`` on the CPU) and the capture itself.

A shape is captured only when it repeats (previews in a sampling loop hit the same shape every
step), new shapes run eager. Captured graphs live in a small LRU whose memory (each graph keeps
its activation pool) is bounded: at most ``GRAPH_MEMORY_CAP`` bytes and a quarter of the device's
free memory; shapes whose estimated peak does not fit run eager, where launch overhead is small
against their work anyway. Graphs are used under ``torch.inference_mode`` only.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from taesd.runtime.executors.base import tracing

GRAPH_CAPACITY = 8  # captured shapes kept per part
GRAPH_REPEATS = 2  # a shape is captured on its second call
GRAPH_MEMORY_CAP = 4 << 30  # bytes all captured graphs of one cache may hold
GRAPH_MEMORY_FRACTION = 0.25  # ... and at most this share of the device's free memory
WARMUP_RUNS = 2  # eager runs before a capture: cuDNN picks its algorithms here


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
    """One captured forward: copy the input into the static buffer, replay, hand out the static
    output in the standard layout: a copy (``copy_output``), or the buffer itself, which the next
    replay of this shape overwrites (then the graph makes it contiguous: no pass outside it)."""

    def __init__(self, graph, static_in: torch.Tensor, static_out: torch.Tensor, copy_output: bool = True):
        self.graph, self.static_in, self.static_out = graph, static_in, static_out
        self.copy_output = copy_output

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_in.copy_(x)
        self.graph.replay()
        if self.copy_output:
            return self.static_out.clone(memory_format=torch.contiguous_format)
        return self.static_out


def static_like(x: torch.Tensor) -> torch.Tensor:
    """The static input buffer: ``x``'s shape and dtype, channels_last for image-shaped tensors."""
    fmt = torch.channels_last if x.dim() == 4 else torch.contiguous_format
    return torch.empty_like(x, memory_format=fmt).copy_(x)


def capture_cuda_graph(fn: Callable, x: torch.Tensor, copy_output: bool = True) -> CapturedRun:
    """Warm ``fn`` up on a side stream (cuDNN autotuning happens here, not inside the capture), then
    capture one call on a static copy of ``x`` into a CUDA graph with its own memory pool."""
    if not copy_output:   # the buffer handed out is the caller's result: standard layout, made in the graph
        fn = _contiguous(fn)
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
    return CapturedRun(graph, static_in, static_out, copy_output)


def _contiguous(fn: Callable) -> Callable:
    return lambda x: fn(x).contiguous()


def graphable(x: torch.Tensor, devices: tuple = ("cuda",)) -> bool:
    """Whether a call may use a captured graph: a tensor on ``devices`` (CUDA) under inference mode,
    not traced, exported or compiled (those need the modules)."""
    return x.device.type in devices and torch.is_inference_mode_enabled() and not tracing()
