"""One encode or decode pass over a clip fed in pieces: the frame bookkeeping around ``run_layers``.

Each published variant frames its clips a little differently (taehv.py's ``encode_video`` and
``decode_video``); these classes reproduce that framing incrementally, so feeding a clip whole, in
fixed chunks or frame by frame gives the same frames:

- "causal" (most variants): the encoder pads the clip at the end with copies of its last frame to a
  multiple of the time downscale; the decoder drops its first ``t_up - 1`` frames.
- "cogvideox": as causal, except that the decoder keeps every frame when the latent count is even
  (and, as upstream's streaming wrapper, always when that count is not known in advance).
- "h3" (MiniMax H3): the encoder works on 17-frame chunks, each led by 3 black frames and started
  from fresh state (the last chunk padded with its last frame), and drops the clip's last 3 latents;
  the decoder drops the first ``t_up - 1`` frames of every ``5 * t_up``, pads the clip with black
  frames to a whole number of those, and drops the last ``3 * t_up`` frames.
Frames that a later step may still drop are held back until it is known.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from taesd.video.temporal import State, run_layers
from taesd.video.tiling import TiledLayers

H3_CHUNK, H3_LEAD, H3_DROP_LATENTS = 17, 3, 3


def _cat(pieces: list[torch.Tensor]) -> torch.Tensor | None:
    pieces = [p for p in pieces if p is not None and p.shape[1]]
    if len(pieces) < 2:
        return pieces[0] if pieces else None      # one piece: no copy
    return torch.cat(pieces, 1)


def _hold(held: torch.Tensor | None, new: torch.Tensor | None, keep: int):
    """(emitted, still held): everything but the last ``keep`` frames of held + new goes out."""
    x = _cat([held, new])
    if x is None or keep == 0:
        return x, None
    cut = max(0, x.shape[1] - keep)
    return (x[:, :cut] if cut else None), x[:, cut:]


class Layers:
    """A layer list run whole-frame on each chunk, its temporal state in ``state``."""

    def __init__(self, layers):
        self.layers, self.state = layers, {}

    def __call__(self, x: torch.Tensor, drop: int = 0) -> torch.Tensor | None:
        return run_layers(self.layers, x, self.state, drop)

    def clear(self) -> None:
        self.state.clear()


def engine(model, part: str, tile_size=None):
    """How a run computes a chunk: whole frames, or tiles of ``tile_size`` latent pixels (seam-exact)."""
    layers = getattr(model, part)
    if tile_size is None:
        return Layers(layers)
    v = model.variant
    return TiledLayers(layers, v.downscale // v.patch_size if part == "encoder" else 1, tile_size)


class EncodeRun:
    """Frames (N x T x 3 x H x W in [0, 1]) in, latents out, piece by piece (``tile_size``: in tiles
    of that many latent pixels)."""

    def __init__(self, model, tile_size=None):
        self.model, self.engine = model, engine(model, "encoder", tile_size)
        self.h3 = model.variant.trim == "h3"
        self.frames_in, self.last, self.held = 0, None, None

    @property
    def state(self):
        return self.engine.state

    def _run(self, x: torch.Tensor) -> torch.Tensor | None:
        y = self.engine(self.model.to_compute(self.model.preprocess(x)))
        return None if y is None else y.to(x.dtype)

    def _feed_h3(self, frames: torch.Tensor) -> list[torch.Tensor | None]:
        out, pos = [], 0
        while pos < frames.shape[1]:
            if self.frames_in % H3_CHUNK == 0:     # a new chunk: fresh state, led by black frames
                self.engine.clear()
                lead = frames.new_zeros(frames.shape[0], H3_LEAD, *frames.shape[2:])
                out.append(self._run(lead))
            take = min(H3_CHUNK - self.frames_in % H3_CHUNK, frames.shape[1] - pos)
            out.append(self._run(frames[:, pos:pos + take]))
            self.frames_in += take
            pos += take
        return out

    def feed(self, frames: torch.Tensor) -> torch.Tensor | None:
        if frames.shape[1] == 0:
            return None
        self.last = frames[:, -1:]
        if self.h3:
            out, self.held = _hold(self.held, _cat(self._feed_h3(frames)), H3_DROP_LATENTS)
            return out
        self.frames_in += frames.shape[1]
        return self._run(frames)

    def finish(self) -> torch.Tensor | None:
        """Pad the clip's end as the published encoder does and return the last latents."""
        period = H3_CHUNK if self.h3 else self.model.time_downscale
        pad = -self.frames_in % period
        out = self.feed(self.last.expand(-1, pad, -1, -1, -1)) if pad and self.last is not None else None
        self.held = None          # h3: the clip's last latents are dropped
        return out


class DecodeRun:
    """Latents in, frames (N x T x 3 x H x W in [0, 1]) out, piece by piece. ``total_latents``:
    the clip's latent count where known (CogVideoX's trimming depends on it); ``tile_size``: in
    tiles of that many latent pixels."""

    def __init__(self, model, total_latents: int | None = None, tile_size=None):
        self.model, self.engine = model, engine(model, "decoder", tile_size)
        self.trim, t_up = model.variant.trim, model.time_upscale
        self.period = 5 * t_up if self.trim == "h3" else 0
        self.lead = t_up - 1
        if self.trim == "cogvideox" and (total_latents is None or total_latents % 2 == 0):
            self.lead = 0
        self.tail = 3 * t_up if self.trim == "h3" else 0
        self.raw_frames, self.held = 0, None

    @property
    def state(self):
        return self.engine.state

    def _kept(self, index: torch.Tensor) -> torch.Tensor:
        return index % self.period >= self.lead if self.period else index >= self.lead

    def _keep(self, y: torch.Tensor) -> torch.Tensor:
        keep = self._kept(torch.arange(self.raw_frames, self.raw_frames + y.shape[1]))
        self.raw_frames += y.shape[1]
        return y if bool(keep.all()) else y[:, keep]

    def _leading_drop(self, n_latents: int) -> int:
        """How many of the next raw frames, from the first on, are dropped (at most all but one:
        the last frame carries the state)."""
        n = n_latents * self.model.time_upscale
        keep = self._kept(torch.arange(self.raw_frames, self.raw_frames + n))
        return int(keep.int().argmax()) if bool(keep.any()) else keep.numel() - 1

    def feed(self, latents: torch.Tensor) -> torch.Tensor | None:
        if latents.shape[1] == 0:
            return None
        drop = self._leading_drop(latents.shape[1])     # not computed, beyond what the state needs
        y = self.engine(self.model.to_compute(latents), drop)
        self.raw_frames += drop
        y = self._keep(self.model.postprocess(None if y is None else y.to(latents.dtype)))
        out, self.held = _hold(self.held, y, self.tail)
        return out

    def finish(self) -> torch.Tensor | None:
        if not self.tail or self.held is None:
            return None
        pad = -self.raw_frames % self.period    # black frames to a whole chunk, then the tail goes
        x = F.pad(self.held, (0, 0, 0, 0, 0, 0, 0, pad))
        self.held = None
        cut = x.shape[1] - self.tail
        return x[:, :cut] if cut > 0 else None


def new_state() -> State:
    return {}
