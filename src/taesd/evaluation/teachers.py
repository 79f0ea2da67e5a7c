"""Teachers: the big autoencoder a student learns from, seen through TAESD's conventions.

Every teacher offers ``encode(images in [0, 1]) -> latents in TAESD's convention`` and
``decode(those latents) -> images in [0, 1]``, so the trainer never sees the teacher's own scaling.

- ``TaesdTeacher``: a TAESD variant (distil a smaller or faster student from taef2, say). Its
  latents already are in TAESD's convention.
- ``DiffusersTeacher``: any diffusers autoencoder saved in a local folder (``config.json`` + weights):
  AutoencoderKL (SD, SDXL, SD3, FLUX.1), AutoencoderKLFlux2, AutoencoderDC, ... Raw latents map
  to TAESD's by the family's latent contract (taesd.integrations.diffusers.contracts): ``(raw -
  shift) * scale``, FLUX.2's BatchNorm statistics over 2x2 patches, or Qwen 2.1's mean/std.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from taesd.errors import TaesdError
from taesd.integrations.diffusers.contracts import LatentContract, contract_for, raw_to_taesd, taesd_to_raw
from taesd.loader import load
from taesd.registry import VARIANTS, get_variant


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
        decoded = self.model.run_part("decoder", self.model.prepare_latents(latents))
        return decoded.clamp(0, 1).float().contiguous()


class DiffusersTeacher:
    """A diffusers VAE whose raw latents map to TAESD's by a latent contract (the same code the
    pipelines' previews use: scale/shift, FLUX.2's BatchNorm over 2x2 patches, Qwen's mean/std)."""

    def __init__(self, vae, contract: LatentContract, name: str):
        self.vae, self.contract, self.name = vae, contract, name
        self.latent_channels = int(vae.config.latent_channels)
        self.downscale = _downscale_of(vae)

    @property
    def scale(self) -> float:
        return self.contract.scale

    @property
    def shift(self) -> float:
        return self.contract.shift

    @property
    def device(self):
        return next(self.vae.parameters()).device

    @property
    def dtype(self):
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode((images * 2 - 1).to(self.device, self.dtype))
        raw = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent
        return raw_to_taesd(raw, self.contract).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raw = taesd_to_raw(latents.to(self.device, self.dtype), self.contract)
        return ((self.vae.decode(raw).sample.float() + 1) / 2).clamp(0, 1)


def _downscale_of(vae) -> int:
    cfg = vae.config
    if hasattr(vae, "spatial_compression_ratio"):
        return int(vae.spatial_compression_ratio)
    blocks = getattr(cfg, "block_out_channels", None) or getattr(cfg, "encoder_block_out_channels", None)
    return 2 ** (len(blocks) - 1) if blocks else 8


def load_diffusers_vae(folder: str | os.PathLike, device=None, dtype=None):
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
        return TaesdTeacher(load(spec, weights=weights, device=device, dtype=dtype))
    if not Path(spec).exists():
        raise TaesdError(f"teacher {spec!r} does not exist: pass a TAESD variant ({', '.join(VARIANTS)}) "
                         f"or a local diffusers autoencoder folder")
    vae = load_diffusers_vae(spec, device=device, dtype=dtype)
    return DiffusersTeacher(vae, teacher_contract(vae, family, scale, shift), Path(spec).name)


def teacher_contract(vae, family: str | None, scale: float | None, shift: float | None) -> LatentContract:
    """The contract of a diffusers teacher: FLUX.2's BatchNorm when the VAE has one; a mean/std
    family's statistics; else (raw - shift) * scale from the arguments, the family or the config."""
    if getattr(vae, "bn", None) is not None:
        return contract_for(vae, variant=family or "taef2")
    mean_std = family is not None and get_variant(family).normalization == "mean_std"
    if mean_std and scale is None and shift is None:
        return contract_for(vae, variant=family)
    cfg = vae.config
    if family is not None:
        v = get_variant(family)
        scale = v.vae_scale if scale is None else scale
        shift = v.vae_shift if shift is None else shift
    scale = float(getattr(cfg, "scaling_factor", None) or 1.0) if scale is None else scale
    shift = float(getattr(cfg, "shift_factor", None) or 0.0) if shift is None else shift
    return LatentContract(variant=family or "", family=type(vae).__name__, normalization="scale_shift",
                          packing="spatial", pipelines=(), scale=scale, shift=shift, source="teacher")
