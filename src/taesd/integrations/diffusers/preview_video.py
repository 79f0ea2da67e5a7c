"""Live previews for diffusers video pipelines: a ``callback_on_step_end`` that decodes a few frames
of the current latents with a TAEHV decoder.

    from taesd.integrations.diffusers.preview_video import VideoPreviewCallback
    preview = VideoPreviewCallback(pipe, "taew2_1.pth", every=5, frames=4, out_dir="previews/")
    video = pipe(prompt, callback_on_step_end=preview).frames[0]
    print(preview.report())                                  # what the previews cost

What is decoded, cheapest first (``frames``):
  "first"  the first latent frame alone: one image
  k (int)  every k-th latent frame, each decoded alone (no temporal memory, one batch): a strip
  "all"    every latent frame as one clip (temporal memory carried): an animation of the whole video
By default the decoder's temporal upsampling is off (``time_upscale=False``): each latent frame
gives one image ("all" costs half as much; one latent alone costs the same either way, the trimmed
sub-frames being skipped). With it on, the "first" preview of a finished run is exactly the first
frame TAEHV decodes for the whole clip.

Cost caps: ``every`` (steps between previews; the last step is always previewed), ``max_frames``
(latent frames per preview, evenly spaced), ``chunk`` (latent frames decoded at once: bounded
memory) and ``max_size`` (longest side of a saved image). The pipeline's latents are read,
never changed: the run's result is the same with or without the callback. A failing preview never
breaks the generation: it is logged once and previews stop (``raise_errors=True`` re-raises).

The latents are converted by the pipeline's contract (``video_contracts``): Wan / HunyuanVideo are
laid out N x C x T x h x w, CogVideoX N x T x C x h x w (divided by its VAE's scaling factor: TAECVX
speaks the raw latent); Krea 2 / Qwen Image (2x2 patches) and LTX-2 (a token sequence) are packed
and need the ``height`` / ``width`` (and, LTX-2, ``num_frames``) the pipeline is called with.
HunyuanVideo 1.5's pipeline has no step callback: ``with preview.watching(pipe): pipe(...)``.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from taesd.errors import TaesdError
from taesd.integrations.diffusers.preview import contact_sheet
from taesd.integrations.diffusers.video import load_for
from taesd.integrations.diffusers.video_contracts import VideoContract, contract_for, to_taehv
from taesd.io.files import atomic_path
from taesd.io.images import tensor_to_pil
from taesd.video import TAEHV
from taesd.video.fast import make_fast

log = logging.getLogger("taesd.integrations.diffusers.preview_video")


@dataclass
class VideoPreview:
    step: int                  # 0-based denoising step that just finished
    timestep: float
    latent_frames: list[int]   # which latent frames were decoded
    frames: torch.Tensor       # K x 3 x H x W in [0, 1], TAEHV's full resolution
    images: list[Image.Image]  # the same, each fitted to max_size
    seconds: float             # what this preview cost (convert + decode + deliver + write)


class VideoPreviewCallback:
    """A diffusers ``callback_on_step_end`` that shows frames of the video being generated.

    pipe: the pipeline (its family picks the latent contract and checks the variant).
    taehv: a TAEHV file, a loaded ``TAEHV`` or a ``TaehvVAE``; default the pipeline's own ``TaehvVAE``.
    every, frames, max_frames, chunk, max_size, time_upscale: what to decode and the cost caps (module
      docstring). fast: the fast CPU executor (on a CPU).
    on_preview: called with a ``VideoPreview`` for every preview.
    out_dir: writes step_SSS.png (the frames side by side) and, for frames="all", step_SSS.webp.
    height, width, num_frames: the call's, for the packed families (Krea 2, Qwen Image, LTX-2).
    """

    tensor_inputs = ["latents"]

    def __init__(self, pipe, taehv=None, *, every: int = 1, frames: str | int = "first",
                 max_frames: int | None = 8, chunk: int | None = None, max_size: int | None = 256,
                 time_upscale: bool = False, fast: bool = True, on_preview=None, out_dir=None,
                 height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 raise_errors: bool = False):
        if every < 1:
            raise TaesdError(f"every must be 1 or more steps, not {every}")
        if not (frames in ("first", "all") or (isinstance(frames, int) and frames >= 1)):
            raise TaesdError(f"frames must be 'first', 'all' or a stride of 1 or more, not {frames!r}")
        if on_preview is None and out_dir is None:
            raise TaesdError("previews go nowhere: pass on_preview=FUNCTION and/or out_dir=FOLDER")
        self.contract: VideoContract = contract_for(pipe)
        self.scaling = float(getattr(pipe, "vae_scaling_factor_image", None)
                             or getattr(getattr(pipe.vae, "config", None), "scaling_factor", 1.0))
        self.grid = _grid(self.contract, pipe, height, width, num_frames)
        self.decoder = _preview_decoder(taehv if taehv is not None else pipe.vae, self.contract,
                                        time_upscale, fast)
        self.every, self.frames, self.max_frames, self.chunk = every, frames, max_frames, chunk
        self.max_size, self.on_preview, self.raise_errors = max_size, on_preview, raise_errors
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.previews: list[VideoPreview] = []
        self.seconds: list[float] = []
        self.decode_seconds: list[float] = []
        self.disabled, self.error = False, None
        self._last_step = -1

    # ------------------------------------------------------------ the callback

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if step <= self._last_step:   # the pipeline was called again: a new run
            self.previews, self.seconds, self.decode_seconds = [], [], []
        self._last_step = step
        total = getattr(pipe, "_num_timesteps", None) or getattr(pipe, "num_timesteps", None)
        last = total is not None and step == int(total) - 1
        if not self.disabled and ((step + 1) % self.every == 0 or last):
            try:
                self._preview(step, timestep, callback_kwargs["latents"])
            except Exception as e:
                if self.raise_errors:
                    raise
                self.disabled, self.error = True, e
                log.warning("taesd video preview failed at step %d, previews are off from now on: %s",
                            step, e, exc_info=True)
        return {}

    @contextlib.contextmanager
    def watching(self, pipe):
        """For pipelines without ``callback_on_step_end`` (HunyuanVideo 1.5): preview after each
        ``pipe.scheduler.step`` inside the block, the scheduler restored after it."""
        if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
            raise TaesdError(f"{type(pipe).__name__} takes callback_on_step_end=: pass the preview there")
        scheduler, calls = pipe.scheduler, [0]
        original, had_own = scheduler.step, "step" in vars(scheduler)

        def step(model_output, timestep, sample, *args, **kwargs):
            out = original(model_output, timestep, sample, *args, **kwargs)
            latents = out[0] if isinstance(out, tuple) else out.prev_sample
            index = getattr(scheduler, "step_index", None)   # restarts with every run
            self(pipe, index - 1 if isinstance(index, int) else calls[0], timestep, {"latents": latents})
            calls[0] += 1
            return out

        scheduler.step = step
        try:
            yield self
        finally:
            if had_own:
                scheduler.step = original
            else:
                del scheduler.step

    def _selected(self, n: int) -> list[int]:
        stride = 1 if self.frames == "all" else self.frames
        picks = [0] if self.frames == "first" else list(range(0, n, stride))
        if self.max_frames is not None and len(picks) > self.max_frames:   # evenly spaced, the first kept
            picks = [picks[round(i * (len(picks) - 1) / max(1, self.max_frames - 1))]
                     for i in range(self.max_frames)]
        return picks

    def _preview(self, step: int, timestep, latents: torch.Tensor) -> None:
        start = time.perf_counter()
        z = to_taehv(latents[:1].detach(), self.contract, scaling_factor=self.scaling, grid=self.grid)
        picks = self._selected(z.shape[1])
        p = next(self.decoder.parameters())
        z = z[:, picks].to(p.device, p.dtype)
        t0 = time.perf_counter()
        with torch.no_grad():
            if self.frames == "all":   # one clip, temporal memory carried
                frames = self.decoder.decode(z, chunk=self.chunk)[0]
            else:                      # each latent alone, as batches of one-latent clips
                clips = z.transpose(0, 1)
                step_size = self.chunk or len(clips)
                frames = torch.cat([self.decoder.decode(clips[i:i + step_size])[:, -1]
                                    for i in range(0, len(clips), step_size)])
        frames = frames.float().cpu()
        self.decode_seconds.append(time.perf_counter() - t0)
        images = [_fit(tensor_to_pil(f), self.max_size) for f in frames]
        preview = VideoPreview(step, float(timestep), picks, frames, images, 0.0)
        if self.out_dir is not None:
            self._write(preview)
        if self.on_preview is not None:
            self.on_preview(preview)
        preview.seconds = time.perf_counter() - start
        self.seconds.append(preview.seconds)
        self.previews.append(preview)

    def _write(self, preview: VideoPreview) -> None:
        strip = contact_sheet(preview.images) if len(preview.images) > 1 else preview.images[0]
        with atomic_path(self.out_dir / f"step_{preview.step:03d}.png") as tmp:
            strip.save(tmp, format="PNG")
        if self.frames == "all" and len(preview.images) > 1:
            with atomic_path(self.out_dir / f"step_{preview.step:03d}.webp") as tmp:
                preview.images[0].save(tmp, format="WEBP", save_all=True, append_images=preview.images[1:],
                                       duration=125, loop=0, lossless=True)

    # ------------------------------------------------------------ cost

    def cost(self) -> dict:
        """Count, median / mean seconds per preview, median decode, total."""
        if not self.seconds:
            return {"previews": 0}
        return {"previews": len(self.seconds), "median_s": statistics.median(self.seconds),
                "mean_s": statistics.fmean(self.seconds),
                "decode_median_s": statistics.median(self.decode_seconds), "total_s": sum(self.seconds)}

    def report(self) -> str:
        c = self.cost()
        if not c["previews"]:
            return "no previews were made" + (f" (previews failed: {self.error})" if self.error else "")
        return (f"{c['previews']} video previews, {c['median_s'] * 1000:.1f} ms each (median; TAEHV decode "
                f"{c['decode_median_s'] * 1000:.1f} ms), {c['total_s']:.2f} s in all")


# ---------------------------------------------------------------- helpers

def _preview_decoder(source, contract: VideoContract, time_upscale: bool, fast: bool) -> TAEHV:
    """A decoder-only TAEHV with the weights of ``source`` (a file, TAEHV or TaehvVAE), its temporal
    upsampling off unless asked for; refused if it speaks another family's latents."""
    model = getattr(source, "taehv", source)
    if not isinstance(model, TAEHV):
        if not isinstance(source, (str, Path)):
            raise TaesdError(f"no TAEHV to preview {contract.family} with: pass taehv=FILE (one of "
                             f"{', '.join(contract.variants)}) or set pipe.vae to a TaehvVAE")
        model = load_for(contract, source)
    if model.variant.name not in contract.variants:
        raise TaesdError(f"{model.variant.name} does not speak {contract.family} latents; "
                         f"use one of {', '.join(contract.variants)}")
    decoder = TAEHV(model.variant, parts="decoder",
                    time_upscale=None if time_upscale else (False, False, False))
    decoder.load_state_dict(model.state_dict())
    p = next(model.parameters())
    decoder = decoder.to(p.device, p.dtype).eval().requires_grad_(False)
    return make_fast(decoder) if fast and p.device.type == "cpu" else decoder


def _grid(contract: VideoContract, pipe, height, width, num_frames) -> tuple[int, int, int] | None:
    """(T', h, w) of a packed family's latents, from the call's size."""
    if contract.layout not in ("patches", "sequence"):
        return None
    if height is None or width is None or (contract.layout == "sequence" and num_frames is None):
        need = "height, width and num_frames" if contract.layout == "sequence" else "height and width"
        raise TaesdError(f"{contract.family} latents are packed: pass the {need} the pipeline is called with")
    if contract.layout == "patches":
        d = getattr(pipe, "vae_scale_factor", 8)
        return 1, height // d, width // d
    s, t = pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio
    return (num_frames - 1) // t + 1, height // s, width // s


def _fit(image: Image.Image, max_size: int | None) -> Image.Image:
    if max_size is None or max(image.size) <= max_size:
        return image
    s = max_size / max(image.size)
    return image.resize((max(1, round(image.width * s)), max(1, round(image.height * s))), Image.BILINEAR)
