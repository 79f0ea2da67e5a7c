"""Images in and out: PIL images and files <-> float tensors in [0, 1].

Rules:
- Any PIL mode is accepted. EXIF orientation is applied. 16-bit images keep their precision.
- RGB variants take RGB: grey is repeated, palette/CMYK converted, alpha dropped (straight
  alpha, so colours are unchanged). The RGBA variant takes RGBA: images without alpha get alpha 1.
- Sizes that are not a multiple of the variant's downscale factor are padded at the bottom and
  right by repeating the edge pixels; the decoded image is cropped back to the original size
  (the latent file records it).
- Every image read goes through one guard (``open_image``): its header's pixel count is checked
  before any pixel is decoded, against ``TAESD_MAX_IMAGE_PIXELS`` when set, else twice PIL's
  decompression-bomb threshold (PIL's own rule). CLI inputs, training data and hold-out images alike.
- Every image written carries taesd's marker (``taesd.io.naming``); a size its format cannot hold
  (WebP 16383, JPEG 65500, GIF 65535 pixels a side) is refused in one line before anything is written.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from taesd import settings
from taesd.errors import TaesdError
from taesd.io.files import atomic_path
from taesd.io.naming import image_marker_options

# The largest side each format can store (PIL raises deep inside its encoders otherwise).
MAX_SIDE = {"WEBP": 16383, "JPEG": 65500, "GIF": 65535}
_pil_limit_lock = threading.Lock()   # Image.MAX_IMAGE_PIXELS is a global: switch it off under a lock


def pixel_limit() -> tuple[int, str]:
    """(the most pixels an input may have, what sets that limit, for messages)."""
    limit = settings.max_image_pixels()
    if limit is not None:
        return limit, f"TAESD_MAX_IMAGE_PIXELS={limit}"
    default = Image.MAX_IMAGE_PIXELS or 89_478_485
    return 2 * default, f"PIL's decompression-bomb limit ({2 * default} pixels)"


def _open_checked(path: Path) -> Image.Image:
    """The decoded image, after its header's size passed the pixel limit (PIL's own check is off
    meanwhile, so the message names the limit the user set, not PIL's twice-over rule)."""
    limit, source = pixel_limit()
    with _pil_limit_lock:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with img:
        w, h = img.size
        if w * h > limit:
            raise TaesdError(f"refusing {path}: {w}x{h} = {w * h} pixels is over {source} (a decompression "
                             f"bomb?); set TAESD_MAX_IMAGE_PIXELS to allow bigger images")
        img.load()
        return ImageOps.exif_transpose(img)


def open_image(path: "str | os.PathLike") -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise TaesdError(f"image {path} does not exist")
    if path.stat().st_size == 0:
        raise TaesdError(f"image {path} is empty")
    try:
        img = _open_checked(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = str(e).splitlines()[0][:120] if str(e).strip() else "corrupt file"
        raise TaesdError(f"cannot read image {path}: {reason}") from e
    return img


def pil_to_tensor(img: Image.Image, channels: int = 3) -> torch.Tensor:
    """A PIL image as a float tensor C x H x W in [0, 1] with ``channels`` (3 or 4) channels."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float32) / 65535.0
        rgb = np.repeat(np.clip(arr, 0, 1)[..., None], 3, axis=2)
        alpha = None
    elif mode == "F":
        rgb = np.repeat(np.clip(np.asarray(img, dtype=np.float32), 0, 1)[..., None], 3, axis=2)
        alpha = None
    else:
        has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info)
        rgba = np.asarray(img.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
        rgb, alpha = rgba[..., :3], (rgba[..., 3:] if has_alpha else None)
    if channels == 4:
        alpha = alpha if alpha is not None else np.ones_like(rgb[..., :1])
        rgb = np.concatenate([rgb, alpha], axis=2)
    elif channels != 3:
        raise TaesdError(f"images have 3 or 4 channels, not {channels}")
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """C x H x W (or 1 x C x H x W) in [0, 1] -> 8-bit RGB / RGBA PIL image."""
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise TaesdError("tensor_to_pil takes one image; index the batch first")
        x = x[0]
    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    if arr.shape[2] not in (3, 4):
        raise TaesdError(f"images have 3 or 4 channels, not {arr.shape[2]}")
    return Image.fromarray(arr, "RGB" if arr.shape[2] == 3 else "RGBA")


def load_image(path: "str | os.PathLike", channels: int = 3) -> torch.Tensor:
    return pil_to_tensor(open_image(path), channels)


def save_image(x: torch.Tensor, path: "str | os.PathLike") -> Path:
    """Write an image tensor atomically; the format follows the file name's suffix."""
    path = Path(path)
    img = tensor_to_pil(x)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise TaesdError(f"cannot tell the image format of {path}; use .png, .jpg or .webp")
    check_writable_size(path, img.height, img.width)
    if fmt == "JPEG" and img.mode == "RGBA":
        img = img.convert("RGB")
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt, **image_marker_options(fmt))
    return path


def check_writable_size(path: "str | os.PathLike", height: int, width: int) -> None:
    """Refuse, in one line, an image size the format of ``path`` cannot store (before any work)."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    side = MAX_SIDE.get(fmt or "")
    if side is not None and max(height, width) > side:
        raise TaesdError(f"cannot write {path}: {fmt} images are at most {side} pixels a side, this one is "
                         f"{width}x{height}; write it as .png")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad N x C x H x W at the bottom/right (edge pixels repeated) up to a multiple; returns the
    padded batch and the original (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        squeeze = x.ndim == 3
        x = F.pad(x[None] if squeeze else x, (0, pw, 0, ph), mode="replicate")
        x = x[0] if squeeze else x
    return x, (h, w)


def crop_to(x: torch.Tensor, size: "tuple[int, int] | None") -> torch.Tensor:
    return x if size is None else x[..., : size[0], : size[1]]
