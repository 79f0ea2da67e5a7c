"""Tile and memory planning: how big a tile, how many images per call, and the peak bytes that
costs, from a part's analysis (``taesd.tiling.receptive``) and measured per-layer activation sizes.

The estimate counts the activations alive at once and multiplies them by the executor's
``memory_overhead`` (what its kernels and the allocator hold beyond them, measured: docs/tiling.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from taesd import settings
from taesd.errors import TaesdError
from taesd.settings import parse_bytes
from taesd.tiling.receptive import PartAnalysis

MIN_TILE = 8          # latent pixels; smaller tiles spend most of their time on margins
# Per tile call and top-level layer: the fixed cost of a call, in output pixels' worth of work.
CALL_PIXELS = 24576   # fitted to measured slowdowns, taef2 decode, tiles 32 to 8 (docs/tiling.md)


@dataclass(frozen=True)
class Pass:
    """One run of a part: ``batch`` images of h x w latent pixels, ``esize`` bytes per element,
    ``out_channels`` in the part's output, on an executor holding ``overhead`` x its live bytes."""
    batch: int
    h: int
    w: int
    esize: int
    out_channels: int
    overhead: float = 1.0


@dataclass
class Plan:
    tile: tuple[int, int]        # latent pixels (h, w); the whole latent when untiled
    batch_chunk: int             # images per tile call
    estimate: int                # estimated peak bytes
    tiled: bool
    work: float = 1.0            # estimated work over the untiled pass (``work_factor``)

    def tiles(self, h: int, w: int) -> int:
        """Tiles per image of h x w latent pixels."""
        return len(splits(h, self.tile[0])) * len(splits(w, self.tile[1]))


def memory_overhead(model, an: PartAnalysis) -> float:
    """Peak bytes over the counted activations on ``model``'s executor (``executor.memory_overhead``);
    without one, the factor for blocked (Winograd) or direct convolutions."""
    executor = getattr(model, "executor", None)
    if executor is not None:
        return float(executor.memory_overhead)
    return settings.tile_overhead(direct=not an.blocked)


def splits(size: int, tile: int) -> list[tuple[int, int]]:
    """Cut [0, size) into ceil(size / tile) near-equal pieces of at most ``tile``."""
    n = -(-size // max(1, tile))
    cuts = [round(i * size / n) for i in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _length(span: tuple[int, int]) -> int:
    return span[1] - span[0]


def _interior_spans(an: PartAnalysis, start: int, stop: int, pass_: Pass, tile: tuple[int, int]):
    """Per boundary, the spans (rows, columns) an interior tile needs: margins on both sides."""
    th, tw = min(tile[0], pass_.h), min(tile[1], pass_.w)
    ah, aw = (pass_.h - th) // 2, (pass_.w - tw) // 2
    fo = an.per_latent[stop]
    sh = an.needed(start, stop, ah * fo, (ah + th) * fo, pass_.h)
    sw = an.needed(start, stop, aw * fo, (aw + tw) * fo, pass_.w)
    return sh, sw


def stage_peak(an: PartAnalysis, start: int, stop: int, pass_: Pass, tile: tuple[int, int]) -> int:
    """Peak bytes of layers [start, stop) for one interior tile (the whole latent when the tile
    covers it), ``pass_.batch`` images at once."""
    sh, sw = _interior_spans(an, start, stop, pass_, tile)
    peak = 0
    for i in range(start, stop):
        info = an.layers[i]
        pix_in = _length(sh[i]) * _length(sw[i])
        pix_out = pix_in * info.up * info.up // (info.down * info.down)
        live = info.in_channels * pix_in + (info.out_channels + info.inner_channels) * pix_out
        peak = max(peak, live)
    return peak * pass_.batch * pass_.esize


def _output_bytes(an: PartAnalysis, pass_: Pass, images: int) -> int:
    return images * pass_.out_channels * pass_.h * pass_.w * an.per_latent[-1] ** 2 * pass_.esize


# Estimates kept per analysis (an analysis is redone when its part changes): ~0.3 ms of Python per
# call otherwise, measured on a 512² decode. At most this many per analysis.
MAX_KEPT_ESTIMATES = 256


def estimate_peak(an: PartAnalysis, pass_: Pass, tile: "tuple[int, int] | None" = None) -> int:
    """Estimated peak bytes of a pass (tile None: the untiled one): the output, the intermediates
    between stages, and the largest working set of any stage."""
    tile = tile or (pass_.h, pass_.w)
    kept = an.__dict__.setdefault("_peaks", {})
    peak = kept.get((pass_, tile))
    if peak is None:
        if len(kept) >= MAX_KEPT_ESTIMATES:
            kept.clear()
        peak = kept[(pass_, tile)] = _estimate_peak(an, pass_, tile)
    return peak


def _estimate_peak(an: PartAnalysis, pass_: Pass, tile: "tuple[int, int]") -> int:
    peak, held = 0, 0
    for start, stop, tiled in an.stages():
        t = tile if tiled else (pass_.h, pass_.w)
        peak = max(peak, held + stage_peak(an, start, stop, pass_, t))
        if stop < len(an.layers):  # the stage output is kept for the next stage
            f = an.per_latent[stop]
            held = pass_.batch * an.layers[stop - 1].out_channels * pass_.h * pass_.w * f * f * pass_.esize
    # + the preallocated output (tiled) or clamped copy (untiled)
    return int(_output_bytes(an, pass_, pass_.batch) + peak * pass_.overhead)


def plan(an: PartAnalysis, pass_: Pass, tile_size=None, max_memory=None,
         available: "int | None" = None) -> Plan:
    """Choose tile size and batch chunk: the user's tile size and/or budget; with neither, tile
    only when the untiled pass would not fit in ``available`` bytes."""
    h, w = pass_.h, pass_.w
    whole = estimate_peak(an, pass_)
    if tile_size is None and max_memory is None:
        if available is None or whole <= available:
            return Plan((h, w), pass_.batch, whole, False)
        max_memory = available // 2  # leave room for everything else the process holds
    th, tw = tile_pair(tile_size) if tile_size is not None else (max(h, w), max(h, w))
    if max_memory is None:
        return Plan((th, tw), pass_.batch, estimate_peak(an, pass_, (th, tw)), True)
    p = _fit_budget(an, pass_, (th, tw), parse_bytes(max_memory))
    p.work = work_factor(an, pass_, p)
    return p


def _fit_budget(an: PartAnalysis, pass_: Pass, limit: tuple[int, int], budget: int) -> Plan:
    """Largest square tile (within ``limit``) that fits ``budget``, preferring the full batch per
    call; smaller batch chunks only when tiles would get too small to be efficient."""
    h, w = pass_.h, pass_.w

    def tiles_of(t: int) -> tuple[int, int]:   # the size ``splits`` really cuts with a limit of t
        return _split_size(h, min(t, limit[0])), _split_size(w, min(t, limit[1]))

    chunk = pass_.batch
    while True:
        part = Pass(chunk, h, w, pass_.esize, pass_.out_channels, pass_.overhead)
        others = _output_bytes(an, pass_, pass_.batch - chunk)   # the preallocated output is whole
        t = _largest_fitting(lambda t: estimate_peak(an, part, tiles_of(t)) + others <= budget, max(limit))
        if t >= min(MIN_TILE, h, w) or chunk == 1:
            tile = tiles_of(max(t, 1))
            return Plan(tile, chunk, estimate_peak(an, part, tile), True)
        chunk = max(1, chunk // 2)


def work_factor(an: PartAnalysis, pass_: Pass, p: Plan) -> float:
    """Estimated work of plan ``p`` over the untiled pass: every tile's computed pixels per layer
    (its margins included) weighted by the layer's cost, plus a fixed cost per tile call and layer."""
    def work(tile: tuple[int, int], chunk: int) -> float:
        total = 0.0
        for start, stop, tiled in an.stages():
            t = tile if tiled else (pass_.h, pass_.w)
            n = len(splits(pass_.h, t[0])) * len(splits(pass_.w, t[1])) * -(-pass_.batch // chunk)
            sh, sw = _interior_spans(an, start, stop, pass_, t)
            for i in range(start, stop):
                info = an.layers[i]
                computed = _length(sh[i]) * _length(sw[i]) * info.up ** 2 // info.down ** 2
                out = computed * min(chunk, pass_.batch)
                total += n * (out + CALL_PIXELS) * info.in_channels * info.out_channels
        return total
    return work(p.tile, p.batch_chunk) / work((pass_.h, pass_.w), pass_.batch)


def _split_size(size: int, tile: int) -> int:
    """The largest piece ``splits(size, tile)`` makes."""
    return max(b - a for a, b in splits(size, tile))


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


def tile_pair(tile_size) -> tuple[int, int]:
    pair = tuple(tile_size) if isinstance(tile_size, (tuple, list)) else (tile_size, tile_size)
    if len(pair) != 2 or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in pair):
        raise TaesdError(f"tile size must be a positive whole number of latent pixels (or a pair), "
                         f"got {tile_size!r}")
    return pair


def check_options(tile_size=None, max_memory=None, names=("tile_size", "max_memory")) -> None:
    """Refuse bad tiling options up front, in one line naming the option as the caller spells it
    (``names``: the CLI passes its flags); ``plan`` would refuse them too, but only once work began."""
    if tile_size is not None:
        try:
            tile_pair(tile_size)
        except TaesdError:
            raise TaesdError(f"{names[0]} must be a positive whole number of latent pixels (e.g. 64), "
                             f"not {tile_size!r}") from None
    if max_memory is None:
        return
    try:
        budget = parse_bytes(max_memory)
    except TaesdError as e:
        if re.fullmatch(r"\s*0*\.?0+\s*[a-zA-Z]*\s*", str(max_memory)):
            raise TaesdError(f"{names[1]} {max_memory}: a budget of nothing cannot run a layer; give the "
                             f"memory the activations may take, e.g. 512MiB or 2GiB") from None
        raise TaesdError(f"{names[1]}: {e}") from None
    if budget <= 0:
        raise TaesdError(f"{names[1]} must be positive, not {max_memory!r}")
