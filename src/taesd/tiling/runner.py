"""Running a plan: seam-exact tiled encode/decode with bounded memory.

Two ways through a part:
- layer by layer (the PyTorch modules): each activation is trimmed to the region the output tile
  needs, so overlap costs only each layer's own margin (near-untiled speed); staged plans (taef2's
  global GroupNorm) run their global span whole.
- any other backend (an overridden ``model.run_part``): ``run_part(part, crop)`` on each
  tile-with-margin, so every backend gets tiling for free.
"""
from __future__ import annotations

import contextvars
import warnings

import torch
from tqdm import tqdm

from taesd.settings import parse_bytes
from taesd.tiling import memory
from taesd.tiling.planner import Pass, Plan, memory_overhead, plan, splits
from taesd.tiling.receptive import PartAnalysis, analyse

# Untiled passes estimated below this never probe free memory (/proc/meminfo, cgroup files): a
# preview-sized call costs nothing extra, and no machine that runs torch lacks this much.
PROBE_ABOVE = 256 << 20
# A budget whose plan is estimated at this many times the untiled work is reported before running.
SLOW_FACTOR = 3.0

# While a tile runs layer by layer: the output pixels per image that the layer being run has in the
# untiled pass. An executor that picks its algorithm by map size (the CPU executor's Winograd
# threshold) decides from this, so a tile uses the same algorithm, and rounds the same, as the whole.
untiled_pixels: "contextvars.ContextVar[int | None]" = contextvars.ContextVar("untiled_pixels", default=None)


def pass_of(model, an: PartAnalysis, x: torch.Tensor) -> Pass:
    """The pass of ``an``'s part on the prepared batch ``x`` with ``model``'s executor."""
    f = an.in_per_latent
    return Pass(x.shape[0], x.shape[-2] // f, x.shape[-1] // f, x.element_size(),
                an.layers[-1].out_channels, memory_overhead(model, an))


def choose_plan(an: PartAnalysis, pass_: Pass, device: torch.device, tile_size=None, max_memory=None) -> Plan:
    """The user's tiling, or (with none asked) tiled only when the untiled pass would not fit what
    is free; free memory is probed only for passes estimated above ``PROBE_ABOVE``."""
    p = plan(an, pass_, tile_size=tile_size, max_memory=max_memory)
    if p.tiled or tile_size is not None or max_memory is not None or p.estimate <= PROBE_ABOVE:
        return p
    return plan(an, pass_, available=memory.available_memory(device))


def run(model, part: str, x: torch.Tensor, tile_size=None, max_memory=None,
        clamp: bool = True) -> torch.Tensor:
    """Run ``part`` on a prepared batch, tiled when asked or when the untiled pass would not fit.
    The decoder's result is clamped to [0, 1] (``clamp=False``: the caller clamps, as ``TAESD.decode``
    does after converting to its dtype and layout: one cheap pass on the contiguous result)."""
    an = analyse(model, part)
    pass_ = pass_of(model, an, x)
    p = choose_plan(an, pass_, x.device, tile_size, max_memory)
    if max_memory is not None and p.work >= SLOW_FACTOR:
        warnings.warn(slow_budget_message(p, pass_, max_memory), stacklevel=3)
    if not p.tiled:
        y = model.run_part(part, x)
        return y.clamp(0, 1) if part == "decoder" and clamp else y
    with memory.budgeted_allocations():   # resident memory follows live memory
        if an.global_span is None and not model.layerwise:
            out = run_part_tiles(model, part, an, x, p)
        else:
            out = run_stages(an, x, p)
    return out.clamp_(0, 1) if part == "decoder" and clamp else out


def slow_budget_message(p: Plan, pass_: Pass, max_memory) -> str:
    """One line: what a small budget costs, said before the run."""
    mib = parse_bytes(max_memory) / 2**20
    chunk = "" if p.batch_chunk == pass_.batch else f", {p.batch_chunk} image(s) per call"
    return (f"a memory budget of {mib:.3g} MiB cuts each image into {p.tiles(pass_.h, pass_.w)} tiles of "
            f"{p.tile[0]}x{p.tile[1]} latent pixels{chunk}: about {p.work:.0f}x the work of an untiled "
            f"pass; a larger budget runs faster")


def _tiles(lat_h: int, lat_w: int, p: Plan, batch: int, desc: str):
    grid = [(rh, rw, b0) for rh in splits(lat_h, p.tile[0]) for rw in splits(lat_w, p.tile[1])
            for b0 in range(0, batch, p.batch_chunk)]
    return tqdm(grid, desc=desc, unit="tile", leave=False, disable=len(grid) < 4 or None, dynamic_ncols=True)


def _empty_output(an: PartAnalysis, stop: int, x: torch.Tensor, lat_h: int, lat_w: int) -> torch.Tensor:
    f = an.per_latent[stop]
    return torch.empty(x.shape[0], an.layers[stop - 1].out_channels, lat_h * f, lat_w * f,
                       dtype=x.dtype, device=x.device)


def run_stages(an: PartAnalysis, x: torch.Tensor, p: Plan) -> torch.Tensor:
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
        for (h0, h1), (w0, w1), b0 in _tiles(lat_h, lat_w, p, x.shape[0], "tiles"):
            sh = an.needed(start, stop, h0 * fo, h1 * fo, lat_h)
            sw = an.needed(start, stop, w0 * fo, w1 * fo, lat_w)
            y = x[b0:b0 + p.batch_chunk, :, sh[start][0]:sh[start][1], sw[start][0]:sw[start][1]]
            y = _run_tile_layers(an, y, start, stop, sh, sw, lat_h * lat_w)
            out[b0:b0 + p.batch_chunk, :, h0 * fo:h1 * fo, w0 * fo:w1 * fo] = y
            del y
        x = out
    return x


def _run_tile_layers(an: PartAnalysis, y: torch.Tensor, start: int, stop: int, sh: dict, sw: dict,
                     latent_pixels: int) -> torch.Tensor:
    """Layers [start, stop) on one tile crop ``y`` (at spans sh[start], sw[start]), trimming each
    activation to the spans the output tile needs."""
    at_h, at_w = sh[start][0], sw[start][0]
    for i in range(start, stop):
        token = untiled_pixels.set(latent_pixels * an.per_latent[i + 1] ** 2)
        try:
            y = an.module[i](y)
        finally:
            untiled_pixels.reset(token)
        info = an.layers[i]
        at_h, at_w = at_h * info.up // info.down, at_w * info.up // info.down
        # Trim to what the output tile needs, so later layers skip the spent margin.
        (nh0, nh1), (nw0, nw1) = sh[i + 1], sw[i + 1]
        if (nh0, nh1, nw0, nw1) != (at_h, at_h + y.shape[-2], at_w, at_w + y.shape[-1]):
            # A copy, not a view: the view would keep the whole untrimmed map alive while the next
            # layer makes its own contiguous copy (one activation too many).
            y = y[..., nh0 - at_h:nh1 - at_h, nw0 - at_w:nw1 - at_w].contiguous(memory_format=_layout(y))
            at_h, at_w = nh0, nw0
    return y


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 \
        else torch.contiguous_format


def run_part_tiles(model, part: str, an: PartAnalysis, x: torch.Tensor, p: Plan) -> torch.Tensor:
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
