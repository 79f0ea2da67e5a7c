"""Seam-exact tiled encode/decode with bounded memory.

Every TAESD layer but one has a bounded receptive field, so an output tile computed from an input
crop with enough margin equals the same region of the untiled pass (up to float rounding). This
module derives that margin from the layer list itself (convolution kernel/stride/padding, nearest
upsampling, pixel (un)shuffle; blocks as the union of their branches), plans tiles on boundaries
that keep strided arithmetic aligned, estimates peak memory from measured per-layer activation
sizes, and runs the plan.

The one global layer is the GroupNorm in taef2's pool branch. It sits in the lowest-resolution
blocks only, so such a part runs as a staged plan: tiled layers before it, the global layers on the
whole (small) intermediate, tiled layers after it; the GroupNorm statistics stay global.

Two executors:
- PyTorch modules (the default backend): run layer by layer and trim each activation to the region
  the output tile needs, so overlap costs only each layer's own margin (near-untiled speed).
- any other backend (an overridden ``model.run_part``): call ``run_part(part, crop)`` on each
  tile-with-margin, so every backend gets tiling for free. Staged plans (taef2) need the modules.
"""
from __future__ import annotations

import contextvars
import math
import os
import re
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

from taesd.errors import TaesdError
from taesd.nn.layers import Block, Clamp
from taesd.runtime.memory import available_bytes, budgeted_allocations

# Layers that act on each pixel alone: no spatial reach.
POINTWISE = (nn.ReLU, nn.SiLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Identity, nn.Dropout)
# Layers whose output depends on every pixel of their input.
GLOBAL = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, nn.AdaptiveAvgPool2d)
MIN_TILE = 8          # latent pixels; smaller tiles spend most of their time on margins
# Peak RSS over the counted activations (measured: docs/tiling.md, checked by tests/test_memory.py).
# oneDNN's direct convolutions hold more beside their input and output than the Winograd kernel.
OVERHEAD = float(os.environ.get("TAESD_TILE_OVERHEAD", 1.15))
OVERHEAD_DIRECT = float(os.environ.get("TAESD_TILE_OVERHEAD_DIRECT", 1.2))
SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
              "t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


# While a tile runs layer by layer: the output pixels per image that the layer being run has in the
# untiled pass. An executor that picks its algorithm by map size (the fast executor's Winograd
# threshold) decides from this, so a tile uses the same algorithm, and rounds the same, as the whole.
untiled_pixels: "contextvars.ContextVar[int | None]" = contextvars.ContextVar("untiled_pixels", default=None)


class GlobalLayer(Exception):
    """Raised while analysing a layer whose output depends on the whole input."""


# ---------------------------------------------------------------- byte sizes

def parse_bytes(value: "int | float | str") -> int:
    """``1073741824``, ``"1GiB"``, ``"512 MB"``, ``"1.5g"`` -> bytes (k/M/G are 1000-based,
    KiB/MiB/GiB 1024)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise TaesdError(f"memory budget must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = m.group(2).lower() if m else None
    if not m or unit not in SIZE_UNITS or float(m.group(1)) <= 0:
        raise TaesdError(f"cannot read memory size {value!r}; write e.g. 1GiB, 512MiB, 2GB or a byte count")
    return int(float(m.group(1)) * SIZE_UNITS[unit])


# ---------------------------------------------------------------- receptive field, from the layers

def needed_interval(m: nn.Module, a: int, b: int) -> tuple[int, int]:
    """The input positions [a', b') one axis of module ``m`` reads to produce outputs [a, b)."""
    if isinstance(m, nn.Conv2d):
        k, s, p, d = m.kernel_size[0], m.stride[0], m.padding[0], m.dilation[0]
        if isinstance(m.padding, str) or m.kernel_size[0] != m.kernel_size[1] or m.stride[0] != m.stride[1]:
            raise TaesdError(f"cannot tile {m}: only square kernels with numeric padding are analysed")
        t = winograd_tile(m)
        if t:  # a Winograd tile's rounding depends on its whole input window: produce whole tiles
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
            a, b = needed_interval(child, a, b)
        return a, b
    if isinstance(m, Block):  # parallel branches, summed: the union of what they read
        spans = [needed_interval(branch, a, b) for branch in _branches(m)]
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


def winograd_tile(conv: nn.Module) -> int:
    """The output tile size m of a convolution an executor runs as Winograd F(m x m, 3x3) (its
    ``winograd`` attribute, set by the fast executor), else 0. Outputs come in m x m tiles laid
    from the map's origin, and each tile's rounding depends on its whole (m+2)^2 input window."""
    m = getattr(conv, "winograd", 0) or 0
    if m and isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1):
        return int(m)
    return 0


def input_alignment(layer: nn.Module) -> int:
    """Multiple a crop start must have at this layer's input so that every Winograd convolution
    inside it (stride 1, at the input's resolution) lays its tiles on the untiled pass's grid."""
    al = 1
    for sub in layer.modules():
        t = winograd_tile(sub)
        if t:
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

    def __init__(self, module: nn.Sequential, in_channels: int, in_per_latent: int):
        self.module = module
        self.in_per_latent = in_per_latent
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
            al, own = info.down * (nxt // math.gcd(nxt, info.up)), input_alignment(module[i])
            self.align[i] = al * own // math.gcd(al, own)
        winograd = any(winograd_tile(m) for m in module.modules())
        self.overhead = OVERHEAD if winograd else OVERHEAD_DIRECT
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
                s, e = needed_interval(self.module[i], a, b)
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


_ANALYSES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def analyse(model, part: str) -> PartAnalysis:
    """The (cached) analysis of ``model.encoder`` or ``model.decoder``; redone when an executor
    changes how its convolutions run (Winograd tiles change the alignment)."""
    module = model.part(part)
    key = tuple(winograd_tile(m) for m in module.modules() if isinstance(m, nn.Conv2d))
    cached = _ANALYSES.get(module)
    if cached is None or cached[0] != key:
        v = model.variant
        if part == "encoder":
            an = PartAnalysis(module, v.image_channels, v.downscale)
        else:
            an = PartAnalysis(module, v.latent_channels, 1)
        _ANALYSES[module] = cached = (key, an)
    return cached[1]


# ---------------------------------------------------------------- tile planning and memory

def splits(size: int, tile: int) -> list[tuple[int, int]]:
    """Cut [0, size) into ceil(size / tile) near-equal pieces of at most ``tile``."""
    n = -(-size // max(1, tile))
    cuts = [round(i * size / n) for i in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


@dataclass
class Plan:
    tile: tuple[int, int]        # latent pixels (h, w); the whole latent when untiled
    batch_chunk: int             # images per tile call
    estimate: int                # estimated peak bytes
    tiled: bool


def _length(span: tuple[int, int]) -> int:
    return span[1] - span[0]


def stage_peak(an: PartAnalysis, start: int, stop: int, batch: int, tile_h: int, tile_w: int,
               h: int, w: int, esize: int) -> int:
    """Peak bytes of layers [start, stop) for one interior tile of tile_h x tile_w latent pixels
    (the whole latent h x w when the tile covers it), batch images at once."""
    th, tw = min(tile_h, h), min(tile_w, w)
    ah, aw = (h - th) // 2, (w - tw) // 2   # an interior tile: margins on both sides
    sh = an.needed(start, stop, ah * an.per_latent[stop], (ah + th) * an.per_latent[stop], h)
    sw = an.needed(start, stop, aw * an.per_latent[stop], (aw + tw) * an.per_latent[stop], w)
    peak = 0
    for i in range(start, stop):
        info = an.layers[i]
        pix_in = _length(sh[i]) * _length(sw[i])
        pix_out = pix_in * info.up * info.up // (info.down * info.down)
        live = info.in_channels * pix_in + (info.out_channels + info.inner_channels) * pix_out
        peak = max(peak, live)
    return peak * batch * esize


def estimate_peak(an: PartAnalysis, batch: int, h: int, w: int, tile_h: int, tile_w: int,
                  esize: int, out_channels: int) -> int:
    """Estimated peak bytes of a pass (tile = (h, w) for the untiled one): the output, the
    intermediates between stages, and the largest working set of any stage."""
    out_bytes = batch * out_channels * h * w * an.per_latent[-1] ** 2 * esize
    peak, held = 0, 0
    for start, stop, tiled in an.stages():
        th, tw = (tile_h, tile_w) if tiled else (h, w)
        peak = max(peak, held + stage_peak(an, start, stop, batch, th, tw, h, w, esize))
        if stop < len(an.layers):  # the stage output is kept for the next stage
            held = batch * an.layers[stop - 1].out_channels * h * w * an.per_latent[stop] ** 2 * esize
    return int(out_bytes + peak * an.overhead)   # + the preallocated output (tiled) or clamped copy (untiled)


def plan(an: PartAnalysis, batch: int, h: int, w: int, esize: int, out_channels: int,
         tile_size=None, max_memory=None, available: "int | None" = None) -> Plan:
    """Choose tile size and batch chunk: the user's tile size and/or budget; with neither, tile
    only when the untiled pass would not fit in ``available`` bytes."""
    whole = estimate_peak(an, batch, h, w, h, w, esize, out_channels)
    if tile_size is None and max_memory is None:
        if available is None or whole <= available:
            return Plan((h, w), batch, whole, False)
        max_memory = available // 2  # leave room for everything else the process holds
    if tile_size is not None:
        th, tw = _tile_pair(tile_size)
    else:
        th = tw = max(h, w)
    budget = parse_bytes(max_memory) if max_memory is not None else None
    if budget is None:
        return Plan((th, tw), batch, estimate_peak(an, batch, h, w, th, tw, esize, out_channels), True)
    # Largest square tile (within the user's) that fits, preferring the full batch per call; fall
    # back to smaller batch chunks only when tiles would get too small to be efficient.
    chunk = batch

    def tiles_of(t: int) -> tuple[int, int]:   # the size ``splits`` really cuts with a limit of t
        return _split_size(h, min(t, th)), _split_size(w, min(t, tw))

    while True:
        t = _largest_fitting(lambda t: estimate_peak(an, chunk, h, w, *tiles_of(t), esize, out_channels)
                             + _other_chunks(batch, chunk, h, w, an, esize, out_channels) <= budget,
                             max(th, tw))
        if t >= min(MIN_TILE, h, w) or chunk == 1:
            th, tw = tiles_of(max(t, 1))
            est = estimate_peak(an, chunk, h, w, th, tw, esize, out_channels)
            return Plan((th, tw), chunk, est, True)
        chunk = max(1, chunk // 2)


def _split_size(size: int, tile: int) -> int:
    """The largest piece ``splits(size, tile)`` makes."""
    return max(b - a for a, b in splits(size, tile))


def _other_chunks(batch, chunk, h, w, an, esize, out_channels) -> int:
    """Output bytes of the images outside the current chunk (the preallocated output is whole)."""
    return (batch - chunk) * out_channels * h * w * an.per_latent[-1] ** 2 * esize


def _largest_fitting(fits, hi: int) -> int:
    """Largest t in [1, hi] with fits(t) (monotone), or 0."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _tile_pair(tile_size) -> tuple[int, int]:
    pair = tuple(tile_size) if isinstance(tile_size, (tuple, list)) else (tile_size, tile_size)
    if len(pair) != 2 or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in pair):
        raise TaesdError(f"tile size must be a positive whole number of latent pixels (or a pair), "
                         f"got {tile_size!r}")
    return pair


def available_memory(device: torch.device) -> int:
    """Free bytes for activations: the GPU's free memory, or what this process may still allocate
    on the host (the host's available memory, capped by its memory cgroup: taesd.runtime.memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_bytes()


# ---------------------------------------------------------------- execution

def run(model, part: str, x: torch.Tensor, tile_size=None, max_memory=None) -> torch.Tensor:
    """Run ``part`` on a prepared batch, tiled when asked or when the untiled pass would not fit.
    The decoder's result is clamped to [0, 1]."""
    an = analyse(model, part)
    lat_h, lat_w = x.shape[-2] // an.in_per_latent, x.shape[-1] // an.in_per_latent
    out_channels = an.layers[-1].out_channels
    p = plan(an, x.shape[0], lat_h, lat_w, x.element_size(), out_channels, tile_size, max_memory,
             available_memory(x.device) if tile_size is None and max_memory is None else None)
    if not p.tiled:
        y = model.run_part(part, x)
        return y.clamp(0, 1) if part == "decoder" else y
    with budgeted_allocations():   # resident memory follows live memory (taesd.runtime.memory)
        if an.global_span is None and not model.layerwise:
            out = _run_part_tiles(model, part, an, x, p)
        else:
            out = _run_stages(an, x, p)
    return out.clamp_(0, 1) if part == "decoder" else out


def _tiles(lat_h: int, lat_w: int, p: Plan, batch: int, desc: str):
    grid = [(rh, rw, b0) for rh in splits(lat_h, p.tile[0]) for rw in splits(lat_w, p.tile[1])
            for b0 in range(0, batch, p.batch_chunk)]
    return tqdm(grid, desc=desc, unit="tile", leave=False, disable=len(grid) < 4 or None, dynamic_ncols=True)


def _empty_output(an: PartAnalysis, stop: int, x: torch.Tensor, lat_h: int, lat_w: int) -> torch.Tensor:
    f = an.per_latent[stop]
    return torch.empty(x.shape[0], an.layers[stop - 1].out_channels, lat_h * f, lat_w * f,
                       dtype=x.dtype, device=x.device)


def _run_stages(an: PartAnalysis, x: torch.Tensor, p: Plan) -> torch.Tensor:
    """Layer-by-layer execution of the staged plan on the PyTorch modules."""
    f0 = an.in_per_latent
    lat_h, lat_w = x.shape[-2] // f0, x.shape[-1] // f0
    for start, stop, tiled in an.stages():
        if not tiled:  # global layers (taef2's GroupNorm): the whole low-resolution intermediate
            for i in range(start, stop):
                x = an.module[i](x)
            continue
        out = _empty_output(an, stop, x, lat_h, lat_w)
        fo = an.per_latent[stop]
        for (h0, h1), (w0, w1), b0 in _tiles(lat_h, lat_w, p, x.shape[0], f"tiles {start}-{stop}"):
            b1 = b0 + p.batch_chunk
            sh = an.needed(start, stop, h0 * fo, h1 * fo, lat_h)
            sw = an.needed(start, stop, w0 * fo, w1 * fo, lat_w)
            y = x[b0:b1, :, sh[start][0]:sh[start][1], sw[start][0]:sw[start][1]]
            at_h, at_w = sh[start][0], sw[start][0]
            for i in range(start, stop):
                token = untiled_pixels.set(lat_h * lat_w * an.per_latent[i + 1] ** 2)
                try:
                    y = an.module[i](y)
                finally:
                    untiled_pixels.reset(token)
                info = an.layers[i]
                at_h, at_w = at_h * info.up // info.down, at_w * info.up // info.down
                # Trim to what the output tile needs, so later layers skip the spent margin.
                (nh0, nh1), (nw0, nw1) = sh[i + 1], sw[i + 1]
                if (nh0, nh1, nw0, nw1) != (at_h, at_h + y.shape[-2], at_w, at_w + y.shape[-1]):
                    # A copy, not a view: the view would keep the whole untrimmed map alive while
                    # the next layer makes its own contiguous copy (one activation too many).
                    y = y[..., nh0 - at_h:nh1 - at_h, nw0 - at_w:nw1 - at_w].contiguous(
                        memory_format=_layout(y))
                    at_h, at_w = nh0, nw0
            out[b0:b1, :, h0 * fo:h1 * fo, w0 * fo:w1 * fo] = y
            del y
        x = out
    return x


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 \
        else torch.contiguous_format


def _run_part_tiles(model, part: str, an: PartAnalysis, x: torch.Tensor, p: Plan) -> torch.Tensor:
    """Backend-neutral execution: ``model.run_part`` on each tile plus its full margin."""
    n = len(an.layers)
    f0 = an.in_per_latent
    lat_h, lat_w = x.shape[-2] // f0, x.shape[-1] // f0
    out = _empty_output(an, n, x, lat_h, lat_w)
    fo = an.per_latent[n]
    for (h0, h1), (w0, w1), b0 in _tiles(lat_h, lat_w, p, x.shape[0], "tiles"):
        b1 = b0 + p.batch_chunk
        ch0, ch1 = an.needed(0, n, h0 * fo, h1 * fo, lat_h)[0]
        cw0, cw1 = an.needed(0, n, w0 * fo, w1 * fo, lat_w)[0]
        y = model.run_part(part, x[b0:b1, :, ch0:ch1, cw0:cw1])
        oh, ow = ch0 // f0 * fo, cw0 // f0 * fo   # where the crop's output starts
        piece = y[..., h0 * fo - oh:h1 * fo - oh, w0 * fo - ow:w1 * fo - ow]
        out[b0:b1, :, h0 * fo:h1 * fo, w0 * fo:w1 * fo] = piece
    return out
