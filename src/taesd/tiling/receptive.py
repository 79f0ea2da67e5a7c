"""Receptive-field analysis, read from the layer list itself.

Every TAESD layer but one has a bounded receptive field, so an output tile computed from an input
crop with enough margin equals the same region of the untiled pass (up to float rounding). This
module derives that margin from the modules (convolution kernel/stride/padding, nearest upsampling,
pixel (un)shuffle; blocks as the union of their branches) and the alignment that keeps strided
arithmetic, and an executor's blocked convolutions, on the untiled pass's grid.

The one global layer is the GroupNorm in taef2's pool branch: ``PartAnalysis.stages`` runs the
span around it whole.

Alignment (``Alignment``: conv -> int): an executor may run a convolution in t x t output blocks laid
from the map's origin, each block's rounding depending on its whole input window (Winograd
F(t x t, 3x3)). Tiles then produce whole blocks and start crops on multiples of t, so a tile rounds
exactly as the untiled pass. 0 or 1: no blocks.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from taesd.errors import TaesdError
from taesd.nn.layers import Block, Clamp

# Layers that act on each pixel alone: no spatial reach.
POINTWISE = (nn.ReLU, nn.SiLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Identity, nn.Dropout)
# Layers whose output depends on every pixel of their input.
GLOBAL = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, nn.AdaptiveAvgPool2d)

Alignment = Callable[[nn.Module], int]


def no_alignment(conv: nn.Module) -> int:
    return 0


class GlobalLayer(Exception):
    """Raised while analysing a layer whose output depends on the whole input."""


def needed_interval(m: nn.Module, a: int, b: int, align: Alignment = no_alignment) -> tuple[int, int]:
    """The input positions [a', b') one axis of module ``m`` reads to produce outputs [a, b)."""
    if isinstance(m, nn.Conv2d):
        k, s, p, d = m.kernel_size[0], m.stride[0], m.padding[0], m.dilation[0]
        if isinstance(m.padding, str) or m.kernel_size[0] != m.kernel_size[1] or m.stride[0] != m.stride[1]:
            raise TaesdError(f"cannot tile {m}: only square kernels with numeric padding are analysed")
        t = align(m)
        if t > 1:  # a block's rounding depends on its whole input window: produce whole blocks
            a, b = (a // t) * t, -(-b // t) * t
        return a * s - p, (b - 1) * s - p + d * (k - 1) + 1
    if isinstance(m, nn.Upsample):
        f = _upsample_factor(m)
        return a // f, -(-b // f)
    if isinstance(m, nn.PixelShuffle):
        f = m.upscale_factor
        return a // f, -(-b // f)
    if isinstance(m, nn.PixelUnshuffle):
        f = m.downscale_factor
        return a * f, b * f
    if isinstance(m, GLOBAL):
        raise GlobalLayer(type(m).__name__)
    if isinstance(m, nn.Sequential):
        for child in reversed(m):
            a, b = needed_interval(child, a, b, align)
        return a, b
    if isinstance(m, Block):  # parallel branches, summed: the union of what they read
        spans = [needed_interval(branch, a, b, align) for branch in _branches(m)]
        return min(s for s, _ in spans), max(e for _, e in spans)
    if isinstance(m, (POINTWISE, Clamp)):
        return a, b
    raise TaesdError(f"cannot tile through layer {type(m).__name__}: its receptive field is unknown")


def scale_of(m: nn.Module) -> tuple[int, int]:
    """(up, down): one input pixel becomes up/down output pixels along each axis."""
    if isinstance(m, nn.Conv2d):
        return 1, m.stride[0]
    if isinstance(m, nn.Upsample):
        return _upsample_factor(m), 1
    if isinstance(m, nn.PixelShuffle):
        return m.upscale_factor, 1
    if isinstance(m, nn.PixelUnshuffle):
        return 1, m.downscale_factor
    if isinstance(m, nn.Sequential):
        up, down = 1, 1
        for child in m:
            u, d = scale_of(child)
            up, down = up * u, down * d
        g = math.gcd(up, down)
        return up // g, down // g
    if isinstance(m, Block):
        return scale_of(m.conv)
    return 1, 1


def input_alignment(layer: nn.Module, align: Alignment = no_alignment) -> int:
    """Multiple a crop start must have at this layer's input so that every blocked convolution
    inside it (stride 1, at the input's resolution) lays its blocks on the untiled pass's grid."""
    al = 1
    for sub in layer.modules():
        t = align(sub) if isinstance(sub, nn.Conv2d) else 0
        if t > 1:
            al = al * t // math.gcd(al, t)
    return al


def is_global(m: nn.Module) -> bool:
    try:
        needed_interval(m, 0, 1)
        return False
    except GlobalLayer:
        return True


def _upsample_factor(m: nn.Upsample) -> int:
    f = m.scale_factor
    f = f[0] if isinstance(f, tuple) else f
    if m.mode != "nearest" or f is None or float(f) != int(f):
        raise TaesdError(f"cannot tile through {m}: only nearest upsampling by an integer factor is analysed")
    return int(f)


def _branches(m: Block) -> list[nn.Module]:
    return [m.conv, m.skip] + ([m.pool] if m.pool is not None else [])


@dataclass(frozen=True)
class LayerInfo:
    """One top-level layer of a part: geometry from the module, activation sizes from a probe."""
    index: int
    up: int
    down: int
    is_global: bool
    in_channels: int
    out_channels: int
    inner_channels: int    # per output pixel: the two largest activations alive inside the layer


class PartAnalysis:
    """What tiling needs to know about one part (encoder or decoder) of a model."""

    def __init__(self, module: nn.Sequential, in_channels: int, in_per_latent: int,
                 align: Alignment = no_alignment):
        self.module = module
        self.in_per_latent = in_per_latent
        self.align_of = align
        self.layers = _probe(module, in_channels, in_per_latent)
        # Positions per latent pixel at each layer boundary (boundary 0 = the part's input).
        self.per_latent = [in_per_latent]
        for info in self.layers:
            q, r = divmod(self.per_latent[-1] * info.up, info.down)
            if r:
                raise TaesdError(f"layer {info.index} leaves the latent grid; cannot tile this part")
            self.per_latent.append(q)
        # A crop starting at boundary l must start at a multiple of align[l] so that every strided
        # layer after it samples the same positions as the full pass.
        self.align = [1] * (len(self.layers) + 1)
        for i in reversed(range(len(self.layers))):
            nxt, info = self.align[i + 1], self.layers[i]
            al, own = info.down * (nxt // math.gcd(nxt, info.up)), input_alignment(module[i], align)
            self.align[i] = al * own // math.gcd(al, own)
        # Whether any convolution runs in blocks (the executor's fast kernel): the planner's overhead.
        self.blocked = any(align(m) > 1 for m in module.modules() if isinstance(m, nn.Conv2d))
        globals_ = [i.index for i in self.layers if i.is_global]
        self.global_span = (globals_[0], globals_[-1] + 1) if globals_ else None

    def stages(self) -> list[tuple[int, int, bool]]:
        """(start, stop, tiled): tiled runs around the span of global layers, which runs whole."""
        n = len(self.layers)
        if self.global_span is None:
            return [(0, n, True)]
        g0, g1 = self.global_span
        return [s for s in [(0, g0, True), (g0, g1, False), (g1, n, True)] if s[0] < s[1]]

    def margin(self, start: int = 0, stop: int | None = None) -> tuple[int, int]:
        """Input pixels of layers [start, stop) needed before/after the input region of one output
        latent pixel far from the borders: the receptive field's reach, rounded out to alignment."""
        stop = len(self.layers) if stop is None else stop
        far, fi, fo = 10**6, self.per_latent[start], self.per_latent[stop]
        a, b = self.needed(start, stop, far * fo, (far + 1) * fo, size=None)[start]
        return far * fi - a, b - (far + 1) * fi

    def needed(self, start: int, stop: int, a: int, b: int, size: "int | None") -> dict[int, tuple[int, int]]:
        """Backward from outputs [a, b) at boundary ``stop``: the interval each boundary must hold,
        rounded out to the alignment and clipped to the image (``size`` latent pixels, None: no clip)."""
        spans = {stop: (a, b)}
        for i in reversed(range(start, stop)):
            if self.layers[i].is_global:  # reads everything: only meaningful for a whole image
                if size is None:
                    raise TaesdError(f"layer {i} is global; it has no finite receptive field")
                s, e = 0, size * self.per_latent[i]
            else:
                s, e = needed_interval(self.module[i], a, b, self.align_of)
            al = self.align[i]
            s, e = (s // al) * al, -(-e // al) * al
            if size is not None:
                s, e = max(s, 0), min(e, size * self.per_latent[i])
            spans[i] = a, b = s, e
        return spans


def _probe(module: nn.Sequential, in_channels: int, in_per_latent: int) -> list[LayerInfo]:
    """Run the part once on a tiny input and record every activation's channels (real sizes, not
    assumptions), then read each top-level layer's geometry from its module."""
    infos = []
    side = 2 * in_per_latent
    p = next(module.parameters())
    x = torch.zeros(1, in_channels, side, side, dtype=p.dtype, device=p.device)
    with torch.inference_mode():
        for i, layer in enumerate(module):
            leaves: list[int] = []
            hooks = [m.register_forward_hook(lambda _m, _i, out: leaves.append(out.numel()))
                     for m in layer.modules() if m is not layer and not list(m.children())]
            try:
                y = layer(x)
            finally:
                for h in hooks:
                    h.remove()
            up, down = scale_of(layer)
            per_out_px = y.shape[-2] * y.shape[-1]
            inner = sum(sorted(leaves)[-2:]) // per_out_px
            infos.append(LayerInfo(i, up, down, is_global(layer), x.shape[1], y.shape[1], inner))
            x = y
    return infos


def winograd_attribute(conv: nn.Module) -> int:
    """Until every executor says ``tile_alignment``: the ``winograd`` tile size the CPU executor
    sets on its 3x3 stride-1 convolutions, else 0."""
    m = getattr(conv, "winograd", 0) or 0
    if m and isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1):
        return int(m)
    return 0


def alignment_of(model) -> Alignment:
    """The block size the model's executor runs each convolution with (``executor.tile_alignment``)."""
    executor = getattr(model, "executor", None)
    if executor is not None:
        return lambda conv: int(executor.tile_alignment(conv) or 0)
    return winograd_attribute


_ANALYSES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def analyse(model, part: str) -> PartAnalysis:
    """The (cached) analysis of ``model.encoder`` or ``model.decoder``; redone when the executor
    changes how its convolutions run (blocked convolutions change the alignment)."""
    module = model.part(part)
    align = alignment_of(model)
    key = tuple(align(m) for m in module.modules() if isinstance(m, nn.Conv2d))
    cached = _ANALYSES.get(module)
    if cached is None or cached[0] != key:
        v = model.variant
        if part == "encoder":
            an = PartAnalysis(module, v.image_channels, v.downscale, align)
        else:
            an = PartAnalysis(module, v.latent_channels, 1, align)
        _ANALYSES[module] = cached = (key, an)
    return cached[1]
