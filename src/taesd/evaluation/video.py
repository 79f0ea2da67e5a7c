"""Video round trips: encode and decode a clip with a TAEHV model and measure what came back.

Per frame: PSNR and SSIM (``taesd.evaluation.metrics``). Over time, the flicker figure: the mean
absolute error of the frame-to-frame change, ``mean |(y_t - y_{t-1}) - (x_t - x_{t-1})|`` in 0-255
units, which is 0 when the decoded clip moves exactly as the original (however blurry) and grows when
frames jitter independently. ``photo_clip`` makes a test clip of pans and zooms over real photographs
(scikit-image's sample images), so figures are about natural content, not noise.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from taesd.errors import TaesdError
from taesd.evaluation.metrics import psnr, ssim
from taesd.io.video import Clip, read_video, write_video

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _photo(name: str) -> torch.Tensor:
    try:
        from skimage import data
    except ImportError as e:
        raise TaesdError("photo_clip needs scikit-image: pip install 'taesd[test]'") from e
    return torch.from_numpy(getattr(data, name)().copy()).permute(2, 0, 1).float().div(255)


def _view(img: torch.Tensor, cy: float, cx: float, zoom: float, size: tuple[int, int]) -> torch.Tensor:
    """The crop of ``img`` centred at (cy, cx) (fractions), 1/zoom of its short side, resized to size."""
    _, h, w = img.shape
    ch = min(h, int(min(h, w * size[0] / size[1]) / zoom))
    cw = min(w, int(ch * size[1] / size[0]))
    top = int(round(min(max(cy * h - ch / 2, 0), h - ch)))
    left = int(round(min(max(cx * w - cw / 2, 0), w - cw)))
    crop = img[:, top:top + ch, left:left + cw][None]
    return F.interpolate(crop, size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def photo_clip(frames: int = 17, size: tuple[int, int] = (256, 384), photos=PHOTOS) -> Clip:
    """A clip of ``frames`` frames (H x W = ``size``): each photo in turn, panned left to right
    and zoomed in by up to 1.5x, with hard cuts between photos (a scene change, as in real video)."""
    per = -(-frames // len(photos))
    out = []
    for k in range(frames):
        img, t = _photo(photos[k // per]), (k % per) / max(per - 1, 1)
        out.append(_view(img, 0.5, 0.3 + 0.4 * t, 1.0 + 0.5 * t, size))
    return Clip(torch.stack(out)[None], fps=16.0)


@dataclass
class VideoMetrics:
    psnr: list[float] = field(default_factory=list)    # dB per frame
    ssim: list[float] = field(default_factory=list)    # per frame
    flicker: float = 0.0                               # mean |change error| per pixel, 0-255

    def summary(self) -> str:
        n = len(self.psnr)
        return (f"{n} frames: PSNR {sum(self.psnr) / n:.2f} dB (min {min(self.psnr):.2f}), "
                f"SSIM {sum(self.ssim) / n:.4f}, flicker {self.flicker:.2f}/255")


def compare_clips(original: torch.Tensor, decoded: torch.Tensor) -> VideoMetrics:
    """Metrics of ``decoded`` against ``original`` (both 1 x T x 3 x H x W in [0, 1])."""
    if original.shape != decoded.shape:
        raise TaesdError(f"clips differ in shape: {tuple(original.shape)} vs {tuple(decoded.shape)}")
    x, y = original[0].double(), decoded[0].double()
    flicker = 0.0
    if x.shape[0] > 1:
        flicker = ((y[1:] - y[:-1]) - (x[1:] - x[:-1])).abs().mean().item() * 255
    ok_ssim = min(x.shape[-2:]) >= 11
    return VideoMetrics(psnr=psnr(x, y).tolist(), ssim=ssim(x, y).tolist() if ok_ssim else [],
                        flicker=flicker)


def pad_frames(frames: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad each frame at the bottom and right (edge pixels repeated) to multiples of ``multiple``."""
    h, w = frames.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return frames
    flat = F.pad(frames.reshape(-1, *frames.shape[-3:]), (0, pw, 0, ph), mode="replicate")
    return flat.reshape(*frames.shape[:2], *flat.shape[1:])


@torch.no_grad()
def roundtrip_video(model, source: Clip | str | os.PathLike, output: str | os.PathLike | None = None,
                    chunk: int | None = None, tile_size=None) -> tuple[VideoMetrics, Clip]:
    """Encode and decode ``source`` (a Clip or a video path) with the TAEHV ``model``; ``chunk``
    frames per step bounds the working memory (None: the whole clip at once), ``tile_size`` (latent
    pixels) each step's working set (seam-exact spatial tiles). The clip is padded to
    the model's size multiple and cropped back; metrics cover the frames both clips have."""
    clip = source if isinstance(source, Clip) else read_video(source)
    frames = clip.frames.to(next(model.parameters()).dtype)
    h, w = frames.shape[-2:]
    latents = model.encode(pad_frames(frames, model.variant.downscale), chunk=chunk, tile_size=tile_size)
    latent_chunk = None if chunk is None else max(1, chunk // model.time_downscale)
    decoded = model.decode(latents, chunk=latent_chunk, tile_size=tile_size)[..., :h, :w].float()
    n = min(decoded.shape[1], frames.shape[1])
    metrics = compare_clips(clip.frames[:, :n].float(), decoded[:, :n])
    result = Clip(decoded[:, :n], clip.fps)
    if output is not None:
        write_video(output, result.frames, result.fps)
    return metrics, result
