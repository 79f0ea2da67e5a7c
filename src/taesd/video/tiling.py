"""Seam-exact spatial tiling for TAEHV, the temporal state shared by the tiles.

TAEHV's layers mix time (a memory block reads the previous frame's input, ``TPool``/``TGrow``
change the frame count) but each reads a bounded neighbourhood in space. So a tile is run exactly as
an image tile is (``taesd.tiling``): the input crop holds the tile plus the receptive field's margin,
and every activation is trimmed to the span the output tile needs. A tile's memory blocks need the
previous frame over their (margin-extended) span, and that is exactly the untiled state there,
because every position a tile holds is computed from all it depends on. So the tiles share one
state, the untiled run's: each reads its span of the previous chunk's and writes its span of the
next. Chunks of frames and streaming
therefore give the untiled result bit for bit while a layer's working set is one tile's.

Alignment as for images: crops start on the grid that strided layers and blocked (Winograd)
convolutions lay from the map's origin, and each tile picks the algorithm the untiled map would
(``taesd.tiling.runner.untiled_pixels``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from taesd.errors import TaesdError
from taesd.nn.taehv import MEMORY_BLOCKS, TGrow, TPool
from taesd.tiling import memory
from taesd.tiling.planner import splits, tile_pair
from taesd.tiling.receptive import needed_interval, scale_of, winograd_attribute
from taesd.tiling.runner import untiled_pixels
from taesd.video.temporal import State, leading_drops, run_layer


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def _upsampled(layer: nn.Module) -> int:
    """The fast executor's fused nearest-upsample + conv (``upsample_factor``), else 1."""
    return int(getattr(layer, "upsample_factor", 1)) if isinstance(layer, nn.Conv2d) else 1


def layer_needed(layer: nn.Module, a: int, b: int) -> tuple[int, int]:
    """The input positions [a', b') one axis of ``layer`` reads to produce outputs [a, b)."""
    if isinstance(layer, (TPool, TGrow)):          # 1x1 convs across frames: no spatial reach
        return a, b
    if isinstance(layer, MEMORY_BLOCKS):           # conv(cat(x, past)) + x or skip(x): past as x
        s, e = needed_interval(layer.conv, a, b, winograd_attribute)
        return min(s, a), max(e, b)
    up = _upsampled(layer)
    if up > 1:                                     # the conv on the upsampled map, then the upsample
        s, e = needed_interval(layer, a, b, winograd_attribute)
        return s // up, -(-e // up)
    return needed_interval(layer, a, b, winograd_attribute)


def _scale(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, (TPool, TGrow, *MEMORY_BLOCKS)):
        return 1, 1
    up, down = scale_of(layer)
    return up * _upsampled(layer), down


def _own_alignment(layer: nn.Module) -> tuple[int, int]:
    """(at the input, at the output): the multiple a crop start must have for the blocked
    convolutions inside ``layer`` to lay their blocks on the untiled grid."""
    t_in = 1
    for sub in layer.modules():
        t = winograd_attribute(sub) if isinstance(sub, nn.Conv2d) else 0
        if t > 1 and _upsampled(sub) == 1:
            t_in = _lcm(t_in, t)
    t_out = max(1, winograd_attribute(layer)) if _upsampled(layer) > 1 else 1
    return t_in, t_out


class TileGeometry:
    """Per layer boundary of a TAEHV layer list: positions per latent pixel, crop alignment, and the
    spans an output tile needs (one axis at a time)."""

    def __init__(self, layers: nn.Sequential, in_per_latent: int):
        self.layers = layers
        scales = [_scale(layer) for layer in layers]
        self.per_latent = [in_per_latent]
        for up, down in scales:
            q, r = divmod(self.per_latent[-1] * up, down)
            if r:
                raise TaesdError("a layer leaves the latent grid; this network cannot be tiled")
            self.per_latent.append(q)
        self.align = [1] * (len(layers) + 1)
        for i in reversed(range(len(layers))):
            (up, down), (t_in, t_out) = scales[i], _own_alignment(layers[i])
            nxt = _lcm(self.align[i + 1], t_out)
            self.align[i] = _lcm(down * (nxt // math.gcd(nxt, up)), t_in)

    def spans(self, a: int, b: int, size: int) -> list[tuple[int, int]]:
        """Outputs [a, b) of the last boundary: the span each boundary must hold (``size`` latent
        pixels along this axis), rounded out to the alignment and clipped to the map."""
        n = len(self.layers)
        out = [(0, 0)] * n + [(a, b)]
        for i in reversed(range(n)):
            s, e = layer_needed(self.layers[i], a, b)
            al = self.align[i]
            s, e = max((s // al) * al, 0), min(-(-e // al) * al, size * self.per_latent[i])
            out[i] = a, b = s, e
        return out


class Tile:
    """One output tile: its spans on both axes at every layer boundary."""

    def __init__(self, rows: tuple[int, int], cols: tuple[int, int], sh: list, sw: list):
        self.rows, self.cols, self.sh, self.sw = rows, cols, sh, sw

    def crop(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """This tile's span of ``t``, a map at boundary ``i``."""
        return t[..., self.sh[i][0]:self.sh[i][1], self.sw[i][0]:self.sw[i][1]]


# Layers whose maps (in and out) have fewer positions per latent pixel than this run on the whole frame:
# their activations are small (a 1/16 of the full-resolution map's area at most), and tiling them
# would recompute the receptive field's widest margins (~19 latent pixels each side at the decoder's
# first stage): measured 4x the untiled time at 480p with 32-pixel tiles, 1.x with this split.
WHOLE_BELOW = 4


def tiled_span(per_latent: list[int], whole_below: int) -> tuple[int, int]:
    """[start, stop): the layers run in tiles, those reading or writing maps of at least
    ``whole_below`` positions per latent pixel (a prefix for an encoder, a suffix for a decoder)."""
    big = [i for i in range(len(per_latent) - 1) if max(per_latent[i], per_latent[i + 1]) >= whole_below]
    if not big:
        return 0, 0
    start, stop = big[0], big[-1] + 1
    if len(big) != stop - start:
        raise TaesdError("the large maps of this network are not one run of layers; cannot tile it")
    return start, stop


class TiledLayers:
    """Runs a layer list on chunks of frames, its large maps in tiles (``WHOLE_BELOW``). ``state`` is
    the untiled run's state, the same tensors bit for bit: each tile reads its span of the previous
    chunk's state and writes its span of the next one (every position a tile holds is exact, so
    overlapping spans write equal values). Two copies of the tiled layers' state live during a
    chunk, never one per tile."""

    def __init__(self, layers: nn.Sequential, in_per_latent: int, tile_size, whole_below: int | None = None):
        self.layers, self.tile = layers, tile_pair(tile_size)
        self.in_per_latent = in_per_latent
        full = TileGeometry(layers, in_per_latent).per_latent
        self.start, self.stop = tiled_span(full, WHOLE_BELOW if whole_below is None else whole_below)
        self.geometry = TileGeometry(layers[self.start:self.stop], full[self.start])
        self.tiles: list[Tile] = []
        self.size: tuple[int, int] | None = None
        self.state: State = {}
        self.drops = [0] * (len(layers) + 1)     # this chunk's ``leading_drops``

    def clear(self) -> None:
        self.state.clear()
        self.size = None

    def _plan(self, h: int, w: int) -> None:
        f = self.in_per_latent
        if h % f or w % f:
            raise TaesdError(f"tiling needs frames of a multiple of {f} network pixels, got {h}x{w}; pad "
                             f"them (taesd.evaluation.video.pad_frames) or drop tile_size")
        lat = (h // f, w // f)
        if self.size == lat:
            return
        if self.size is not None:
            raise TaesdError(f"the frame size changed within a clip ({self.size} -> {lat} latent pixels); "
                             f"start a new run for a new size")
        self.size, fo = lat, self.geometry.per_latent[-1]
        self.tiles = [Tile(rh, rw, self.geometry.spans(rh[0] * fo, rh[1] * fo, lat[0]),
                           self.geometry.spans(rw[0] * fo, rw[1] * fo, lat[1]))
                      for rh in splits(lat[0], self.tile[0]) for rw in splits(lat[1], self.tile[1])]

    def _whole(self, x: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
        for i in range(start, stop):
            if x is None or x.shape[1] == 0:
                return None
            x = run_layer(self.layers[i], i, x, self.state, self.drops[i + 1])
        return None if x is None or x.shape[1] == 0 else x

    def __call__(self, x: torch.Tensor, drop: int = 0) -> torch.Tensor | None:
        """The chunk ``x`` (N x T x C x H x W) through every layer, the large maps tile by tile;
        ``drop`` as for ``run_layers``."""
        self._plan(*x.shape[-2:])
        self.drops = leading_drops(self.layers, drop)
        x = self._whole(x[:, self.drops[0]:], 0, self.start)
        if x is None or self.start == self.stop:
            return self._whole(x, self.stop, len(self.layers))
        fo, out, nxt, at = self.geometry.per_latent[-1], None, {}, self.start
        with memory.budgeted_allocations():    # resident memory follows live memory, not the heap's peak
            for tile in self.tiles:
                state = {i: tile.crop(i - at, s) for i, s in self.state.items() if at <= i < self.stop}
                y = self._run_tile(tile, x, state)
                self._write_state(tile, state, nxt)
                if y is None:
                    continue
                if out is None:
                    out = y.new_empty(*y.shape[:3], self.size[0] * fo, self.size[1] * fo)
                out[..., tile.rows[0] * fo:tile.rows[1] * fo, tile.cols[0] * fo:tile.cols[1] * fo] = y
        self.state.update(nxt)
        return self._whole(out, self.stop, len(self.layers))

    def _write_state(self, tile: Tile, state: State, nxt: State) -> None:
        for i, s in state.items():
            full = nxt.get(i)
            if full is None:
                per = self.geometry.per_latent[i - self.start]
                full = nxt[i] = s.new_zeros(*s.shape[:-2], self.size[0] * per, self.size[1] * per)
            tile.crop(i - self.start, full).copy_(s)

    def _run_tile(self, tile: Tile, x: torch.Tensor, state: State) -> torch.Tensor | None:
        """Layers [start, stop) on this tile's crop of ``x``, trimming each map to the tile's span."""
        sh, sw, per = tile.sh, tile.sw, self.geometry.per_latent
        y = x[..., sh[0][0]:sh[0][1], sw[0][0]:sw[0][1]]
        pixels = self.size[0] * self.size[1]
        for k in range(self.stop - self.start):
            token = untiled_pixels.set(pixels * per[k + 1] ** 2)
            try:
                i = self.start + k
                y = run_layer(self.layers[i], i, y, state, self.drops[i + 1])
            finally:
                untiled_pixels.reset(token)
            if y.shape[1] == 0:
                return None
            at_h, at_w = sh[k][0] * per[k + 1] // per[k], sw[k][0] * per[k + 1] // per[k]
            (h0, h1), (w0, w1) = sh[k + 1], sw[k + 1]
            if (h0, h1, w0, w1) != (at_h, at_h + y.shape[-2], at_w, at_w + y.shape[-1]):
                # a copy: a view would keep the untrimmed map (and, through the state, its frame) alive
                y = y[..., h0 - at_h:h1 - at_h, w0 - at_w:w1 - at_w]
                y = y.clone(memory_format=torch.preserve_format)
        return y
