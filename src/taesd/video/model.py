"""``TAEHV``: one video variant's encoder and decoder, run three ways with one result.

- whole clip: ``encode(frames)`` / ``decode(latents)`` (every frame in one batch per layer);
- bounded memory: ``encode(frames, chunk=k)`` / ``decode(latents, chunk=k)``, or the generators
  ``encode_chunks``/``decode_chunks`` that hand out each piece as soon as it is done (working memory
  set by ``k``, not by the clip's length);
- streaming: ``stream()`` returns a ``VideoStream`` whose ``encode``/``decode`` take frames or latents
  as they arrive and ``flush`` ends the clip; its state is a dict of tensors per part.

Frames are ``N x T x 3 x H x W`` in [0, 1], latents ``N x T' x C x H/d x W/d`` (NTCHW, as published).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from taesd.errors import TaesdError
from taesd.nn.taehv import TGrow, TPool, build_video_decoder, build_video_encoder
from taesd.registry import VideoVariant, get_video_variant
from taesd.tiling import memory
from taesd.video.runs import DecodeRun, EncodeRun, _cat
from taesd.video.temporal import state_shapes, step


class TAEHV(nn.Module):
    """A TAEHV encoder and/or decoder. ``time_upscale``/``space_upscale`` (three booleans each)
    switch decoder stages off for cheaper previews, as upstream's ``decoder_*_upscale``."""

    def __init__(self, variant: str | VideoVariant, parts=("encoder", "decoder"),
                 time_upscale: tuple[bool, bool, bool] | None = None,
                 space_upscale: tuple[bool, bool, bool] = (True, True, True)):
        super().__init__()
        self.variant = get_video_variant(variant)
        parts = (parts,) if isinstance(parts, str) else tuple(parts)
        self.encoder = build_video_encoder(self.variant) if "encoder" in parts else None
        self.decoder = (build_video_decoder(self.variant, time_upscale, space_upscale)
                        if "decoder" in parts else None)
        self.weights_info: dict = {}
        # What encode/decode/stream compute in (``make_fast`` sets it by the CPU rule: bf16 on AMX and
        # AVX-512-BF16 CPUs);
        # None: the weights' dtype. Inputs are cast to it, outputs come back in the input's dtype.
        self.compute_dtype: torch.dtype | None = None

    # --- facts -----------------------------------------------------------------------------------------
    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in ("encoder", "decoder") if getattr(self, p) is not None)

    @property
    def time_downscale(self) -> int:
        return 2 ** sum(m.stride == 2 for m in self._part("encoder") if isinstance(m, TPool))

    @property
    def time_upscale(self) -> int:
        return 2 ** sum(m.stride == 2 for m in self._part("decoder") if isinstance(m, TGrow))

    def _part(self, part: str) -> nn.Sequential:
        module = getattr(self, part)
        if module is None:
            raise TaesdError(f"this {self.variant.name} model has no {part}; load it with {part!r} in parts")
        return module

    def to_compute(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the dtype the network runs in (``compute_dtype``, else the weights')."""
        dtype = self.compute_dtype or next(self.parameters()).dtype
        return x if x.dtype == dtype or not x.is_floating_point() else x.to(dtype)

    # --- pixels <-> network frames ----------------------------------------------------------------------
    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        p = self.variant.patch_size
        if p == 1:
            return frames
        # flatten/unflatten, not reshape with sizes: an ONNX trace keeps the sizes dynamic
        return F.pixel_unshuffle(frames.flatten(0, 1), p).unflatten(0, (frames.shape[0], -1))

    def postprocess(self, x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        p = self.variant.patch_size
        if p > 1:     # pixel_shuffle makes a new tensor: clamp it in place
            return F.pixel_shuffle(x.flatten(0, 1), p).unflatten(0, (x.shape[0], -1)).clamp_(0, 1)
        return x.clamp(0, 1)

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 5 or x.shape[2] != channels:
            raise TaesdError(f"{self.variant.name} expects {what} as N x T x {channels} x H x W (NTCHW), "
                             f"got shape {tuple(x.shape)}; add the batch/time axes or permute from NCTHW")

    # --- the three modes ------------------------------------------------------------------------------
    def encode_chunks(self, frames: torch.Tensor, chunk: int | None = None,
                      tile_size=None) -> Iterator[torch.Tensor]:
        """Latents of ``frames``, piece by piece (``chunk`` frames per step; all at once if None).
        ``tile_size`` (latent pixels, an int or (h, w)): run in spatial tiles, seam-exact, each with
        its own temporal state; the frames' size must then be a multiple of the downscale."""
        self._check(frames, self.variant.image_channels, "frames")
        self._part("encoder")
        yield from _pieces(EncodeRun(self, tile_size), frames, chunk)

    def decode_chunks(self, latents: torch.Tensor, chunk: int | None = None,
                      tile_size=None) -> Iterator[torch.Tensor]:
        """Frames of ``latents``, handed out piece by piece (``chunk`` latents per step; ``tile_size``
        as for ``encode_chunks``)."""
        self._check(latents, self.variant.latent_channels, "latents")
        self._part("decoder")
        run = DecodeRun(self, total_latents=latents.shape[1], tile_size=tile_size)
        yield from _pieces(run, latents, chunk)

    def encode(self, frames: torch.Tensor, chunk: int | None = None, tile_size=None) -> torch.Tensor:
        return _joined(list(self.encode_chunks(frames, chunk, tile_size)), frames)

    def decode(self, latents: torch.Tensor, chunk: int | None = None, tile_size=None) -> torch.Tensor:
        return _joined(list(self.decode_chunks(latents, chunk, tile_size)), latents)

    def stream(self, tile_size=None) -> VideoStream:
        """A streaming session (``tile_size``: each step runs in seam-exact spatial tiles)."""
        return VideoStream(self, tile_size)

    # --- the functional step (fixed-shape state: CUDA graphs, torch.compile) ---------------------------
    def init_state(self, part: str, batch: int, height: int, width: int) -> tuple[torch.Tensor, ...]:
        """Zeros for ``step``: one ``batch x C x H x W`` tensor per memory block of ``part``, for
        frames of ``height x width`` pixels (encoder) or latents of that size (decoder)."""
        layers = self._part(part)
        p = self.variant.patch_size
        c, h, w = ((self.variant.image_channels * p * p, height // p, width // p) if part == "encoder"
                   else (self.variant.latent_channels, height, width))
        ref = next(self.parameters())
        return tuple(ref.new_zeros(batch, *shape) for shape in state_shapes(layers, c, h, w))

    def step(self, part: str, x: torch.Tensor, state: tuple[torch.Tensor, ...]):
        """``(output, new_state)`` for one group: the encoder takes ``time_downscale`` frames
        (N x t x 3 x H x W in [0, 1]) and gives one latent; the decoder takes latents and gives the
        *raw* frames (no trimming: drop the first ``time_upscale - 1`` of a clip as ``decode`` does).
        Pure: no Python state, same shapes every step."""
        if part == "encoder":
            y, state = step(self._part(part), self.preprocess(x), state)
            return y, state
        y, state = step(self._part(part), x, state)
        return self.postprocess(y), state

    # --- weights ----------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Published keys (``encoder.N.*``/``decoder.N.*``); a part this model lacks is skipped, and a
        TGrow switched off keeps the last-timestep channels of its published weight."""
        own = self.state_dict()
        sd = {k: v for k, v in state_dict.items() if k in own or k.split(".")[0] in self.parts}
        for k, v in own.items():
            if k in sd and k.endswith(".conv.weight") and sd[k].shape[0] > v.shape[0] == sd[k].shape[1]:
                sd[k] = sd[k][-v.shape[0]:]
        return super().load_state_dict(sd, strict=strict, assign=assign)


def _joined(pieces: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    out = _cat(pieces)
    if out is None:
        raise TaesdError(f"a clip of {like.shape[1]} frames/latents gives no output; feed a longer clip")
    return out


class VideoStream:
    """Frames or latents as they arrive. ``encode(frames)`` returns the latents that are complete (or
    None), ``decode(latents)`` the frames; ``flush_encoder``/``flush_decoder`` end a clip (the encoder pads
    its input as the whole-clip path does), ``flush`` both, for video to video. ``state`` holds the
    temporal state as tensors (per part: layer index -> tensor)."""

    def __init__(self, model: TAEHV, tile_size=None):
        self.model = model
        self._enc = EncodeRun(model, tile_size) if model.encoder is not None else None
        self._dec = DecodeRun(model, tile_size=tile_size) if model.decoder is not None else None

    @property
    def state(self) -> dict[str, dict[int, torch.Tensor]]:
        return {p: r.state for p, r in (("encoder", self._enc), ("decoder", self._dec)) if r is not None}

    def encode(self, frames: torch.Tensor) -> torch.Tensor | None:
        self.model._check(frames, self.model.variant.image_channels, "frames")
        return self._enc.feed(frames)

    def decode(self, latents: torch.Tensor) -> torch.Tensor | None:
        self.model._check(latents, self.model.variant.latent_channels, "latents")
        return self._dec.feed(latents)

    def flush_encoder(self) -> torch.Tensor | None:
        """End the input clip: pad it as the whole-clip encoder does; the last latents (or None)."""
        return self._enc.finish()

    def flush_decoder(self) -> torch.Tensor | None:
        """End the latent clip: the frames still held back (or None)."""
        return self._dec.finish()

    def flush(self) -> torch.Tensor | None:
        """Video to video: flush the encoder, decode its last latents, flush the decoder."""
        latents = self.flush_encoder()
        return _cat([self._dec.feed(latents) if latents is not None else None, self.flush_decoder()])


def _pieces(run, x: torch.Tensor, chunk: int | None) -> Iterator[torch.Tensor]:
    """Feed ``x`` to a run ``chunk`` frames at a time (all at once if None); yield what it hands out.
    Bounded mode runs each step with big blocks mmapped and unmapped on free (``budgeted_allocations``,
    entered per step, never across a yield): a heap that keeps them for reuse fragments and grew over
    the first chunks (480x832 taew2_1: 1750 -> 2677 MiB over 6 chunks, then flat; so 17 frames peaked
    lower than 81), while mmapped blocks keep the peak flat from the third chunk on (1475 MiB)."""
    step = chunk or max(x.shape[1], 1)
    budget = memory.budgeted_allocations if chunk else contextlib.nullcontext
    for start in range(0, x.shape[1], step):
        with budget():
            out = run.feed(x[:, start:start + step])
        if out is not None:
            yield out
    with budget():
        out = run.finish()
    if out is not None:
        yield out
