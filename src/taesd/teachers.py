"""Teachers: the big autoencoder a student learns from, seen through TAESD's conventions.

Every teacher offers ``encode(images in [0, 1]) -> latents in TAESD's convention`` and
``decode(those latents) -> images in [0, 1]``, so the trainer never sees the teacher's own scaling.

- ``TaesdTeacher``: a TAESD variant (distil a smaller or faster student from taef2, say). Its
  latents already are in TAESD's convention.
- ``DiffusersTeacher``: any diffusers autoencoder saved in a local folder (``config.json`` + weights):
  AutoencoderKL (SD, SDXL, SD3, FLUX.1), AutoencoderKLFlux2, AutoencoderDC, ... Raw latents map
  to TAESD's by ``taesd = (raw - shift) * scale``; FLUX.2's VAE additionally normalises with its
  BatchNorm statistics over 2x2 patches (as the FLUX.2 pipeline does), which is done here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import TaesdError
from .variants import VARIANTS, get_variant


class TaesdTeacher:
    def __init__(self, model):
        self.model = model
        self.latent_channels = model.variant.latent_channels
        self.downscale = model.variant.downscale
        self.name = model.variant.name

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.run_part("encoder", self.model.prepare_images(images)).float().contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.run_part("decoder", self.model.prepare_latents(latents)).clamp(0, 1).float().contiguous()


class DiffusersTeacher:
    def __init__(self, vae, scale: float, shift: float, name: str):
        self.vae, self.scale, self.shift, self.name = vae, scale, shift, name
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.downscale = _downscale_of(vae)
        self.bn = getattr(vae, "bn", None)  # FLUX.2: latents are BatchNorm-normalised 2x2 patches
        self.patch = tuple(getattr(cfg, "patch_size", None) or (2, 2)) if self.bn is not None else None

    @property
    def device(self):
        return next(self.vae.parameters()).device

    @property
    def dtype(self):
        return next(self.vae.parameters()).dtype

    def _bn_stats(self, latents: torch.Tensor):
        # BatchNorm stats are per (channel, dy, dx) of a 2x2 patch; spread them over the unpatchified grid.
        ph, pw = self.patch
        c = self.latent_channels
        mean = self.bn.running_mean.view(c, ph, pw)
        std = (self.bn.running_var + self.bn.eps).sqrt().view(c, ph, pw)
        h, w = latents.shape[-2:]
        tile = (1, h // ph, w // pw)
        return (mean.repeat(tile)[None].to(latents), std.repeat(tile)[None].to(latents))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode((images * 2 - 1).to(self.device, self.dtype))
        raw = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent
        if self.bn is not None:
            mean, std = self._bn_stats(raw)
            raw = (raw - mean) / std
        return ((raw - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raw = latents.to(self.device, self.dtype) / self.scale + self.shift
        if self.bn is not None:
            mean, std = self._bn_stats(raw)
            raw = raw * std + mean
        return ((self.vae.decode(raw).sample.float() + 1) / 2).clamp(0, 1)


def _downscale_of(vae) -> int:
    cfg = vae.config
    if hasattr(vae, "spatial_compression_ratio"):
        return int(vae.spatial_compression_ratio)
    blocks = getattr(cfg, "block_out_channels", None) or getattr(cfg, "encoder_block_out_channels", None)
    return 2 ** (len(blocks) - 1) if blocks else 8


def load_diffusers_vae(folder: "str | os.PathLike", device=None, dtype=None):
    """A diffusers autoencoder from a local folder (never downloads)."""
    import diffusers
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise TaesdError(f"{folder} is no diffusers autoencoder folder (no config.json)")
    cls_name = json.loads(cfg_path.read_text()).get("_class_name", "")
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.startswith("Autoencoder"):
        raise TaesdError(f"{folder} holds a {cls_name or 'unknown'} model, not a diffusers autoencoder "
                         f"this diffusers ({diffusers.__version__}) knows")
    vae = cls.from_pretrained(folder, local_files_only=True)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_teacher(spec: str, weights=None, scale: float | None = None, shift: float | None = None,
                 family: str | None = None, device=None, dtype=None):
    """``spec``: a TAESD variant name (weights from ``weights``/$TAESD_WEIGHTS) or a diffusers folder.

    For a diffusers teacher the scale/shift come from ``scale``/``shift``, else from the registry
    entry ``family`` (a variant name whose latent space the VAE has), else from the VAE's own
    config (``scaling_factor``, ``shift_factor``).
    """
    if spec in VARIANTS and not Path(spec).exists():
        from .loader import load
        return TaesdTeacher(load(spec, weights=weights, device=device, dtype=dtype))
    vae = load_diffusers_vae(spec, device=device, dtype=dtype)
    cfg = vae.config
    if family is not None:
        v = get_variant(family)
        scale = v.vae_scale if scale is None else scale
        shift = v.vae_shift if shift is None else shift
    scale = float(getattr(cfg, "scaling_factor", None) or 1.0) if scale is None else scale
    shift = float(getattr(cfg, "shift_factor", None) or 0.0) if shift is None else shift
    return DiffusersTeacher(vae, scale, shift, Path(spec).name)
