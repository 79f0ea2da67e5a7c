"""Video files in and out: mp4/webm/mkv/mov through PyAV (the ``video`` extra), GIF through Pillow,
and folders of numbered image frames.

Frames travel as float tensors ``1 x T x 3 x H x W`` in [0, 1] (TAEHV's NTCHW) with their frame
rate. ``iter_frames`` reads one frame at a time, so a bounded-memory pipeline never holds a clip.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from taesd.errors import TaesdError

CONTAINERS = {".mp4": "libx264", ".mkv": "libx264", ".mov": "libx264", ".webm": "libvpx-vp9"}
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_FPS = 16.0


@dataclass
class Clip:
    frames: torch.Tensor          # 1 x T x 3 x H x W, float in [0, 1]
    fps: float = DEFAULT_FPS

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.frames.shape[-2:])


def is_video_path(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.suffix.lower() in (*CONTAINERS, ".gif") or p.is_dir()


def _av():
    try:
        import av
    except ImportError as e:
        raise TaesdError("reading or writing mp4/webm needs PyAV: pip install 'taesd[video]'") from e
    return av


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)


def _to_uint8(frame: torch.Tensor) -> np.ndarray:
    return frame.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def _frame_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise TaesdError(f"{folder} holds no image frames ({', '.join(FRAME_SUFFIXES)}); pass a frame folder")
    return files


def probe_fps(path: str | os.PathLike) -> float:
    p = Path(path)
    if p.is_dir():
        return DEFAULT_FPS
    if p.suffix.lower() == ".gif":
        with Image.open(p) as im:
            ms = im.info.get("duration") or 1000 / DEFAULT_FPS
        return 1000.0 / ms
    with _av().open(str(p)) as container:
        rate = container.streams.video[0].average_rate
    return float(rate) if rate else DEFAULT_FPS


def iter_frames(path: str | os.PathLike) -> Iterator[torch.Tensor]:
    """Frames of a video file, GIF or frame folder, one at a time: ``3 x H x W`` in [0, 1]."""
    p = Path(path)
    if not p.exists():
        raise TaesdError(f"no video at {p}; check the path")
    if p.is_dir():
        first = None
        for f in _frame_files(p):
            with Image.open(f) as im:
                if first is None:
                    first = (f, im.size)
                elif im.size != first[1]:   # photos of several sizes are not a clip
                    raise TaesdError(f"{f} is {im.size[0]}x{im.size[1]} but {first[0].name} is "
                                     f"{first[1][0]}x{first[1][1]}: a frame folder holds frames of one size")
                yield _to_tensor(np.asarray(im.convert("RGB")))
    elif p.suffix.lower() == ".gif":
        with Image.open(p) as im:
            for k in range(getattr(im, "n_frames", 1)):
                im.seek(k)
                yield _to_tensor(np.asarray(im.convert("RGB")))
    else:
        with _av().open(str(p)) as container:
            for frame in container.decode(video=0):
                yield _to_tensor(frame.to_ndarray(format="rgb24"))


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> Clip:
    frames = []
    for frame in iter_frames(path):
        frames.append(frame)
        if max_frames is not None and len(frames) >= max_frames:
            break
    if not frames:
        raise TaesdError(f"{path} holds no frames")
    return Clip(torch.stack(frames)[None], probe_fps(path))


class VideoWriter:
    """Frames in, a file out, as they come: ``write(frames)`` takes ``[1 x] T x 3 x H x W``."""

    def __init__(self, path: str | os.PathLike, fps: float = DEFAULT_FPS, quality: int = 18):
        self.path, self.fps, self.quality = Path(path), fps, quality
        self.suffix = self.path.suffix.lower() if not self.path.is_dir() and self.path.suffix else ""
        if self.suffix not in (*CONTAINERS, ".gif", ""):
            raise TaesdError(f"cannot write {self.path.name}: use .mp4, .webm, .mkv, .mov, .gif or a folder")
        self.count, self._container, self._stream, self._gif = 0, None, None, []
        if not self.suffix:
            self.path.mkdir(parents=True, exist_ok=True)

    def _open(self, h: int, w: int) -> None:
        av = _av()
        self._container = av.open(str(self.path), mode="w")
        codec = CONTAINERS[self.suffix]
        rate = Fraction(self.fps).limit_denominator(1001)
        self._stream = self._container.add_stream(codec, rate=rate)
        self._stream.width, self._stream.height = w, h
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(self.quality)} if codec == "libx264" else {"crf": "20", "b": "0"}

    def write(self, frames: torch.Tensor) -> None:
        frames = frames.reshape(-1, *frames.shape[-3:])
        for frame in frames:
            rgb = _to_uint8(frame)
            if not self.suffix:
                Image.fromarray(rgb).save(self.path / f"{self.count:06d}.png")
            elif self.suffix == ".gif":
                self._gif.append(Image.fromarray(rgb))
            else:
                if self._container is None:
                    self._open(*rgb.shape[:2])
                av_frame = _av().VideoFrame.from_ndarray(rgb, format="rgb24")
                for packet in self._stream.encode(av_frame):
                    self._container.mux(packet)
            self.count += 1

    def close(self) -> Path:
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None
        if self._gif:
            self._gif[0].save(self.path, save_all=True, append_images=self._gif[1:],
                              duration=round(1000 / self.fps), loop=0)
            self._gif = []
        return self.path

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | os.PathLike, frames: torch.Tensor | Iterable[torch.Tensor],
                fps: float = DEFAULT_FPS) -> Path:
    """Write a clip (``1 x T x 3 x H x W``) or an iterable of frame chunks; returns the path.
    Even sizes for mp4/webm (yuv420p)."""
    with VideoWriter(path, fps) as writer:
        for chunk in ([frames] if isinstance(frames, torch.Tensor) else frames):
            writer.write(chunk)
    return Path(path)
