"""``TaehvVAE``: a TAEHV variant as a diffusers VAE, a drop-in ``pipe.vae`` for the pipelines of the
video VAEs it shares a latent space with (Wan: ``WanPipeline``; Qwen Image: ``QwenImagePipeline`` and
Edit, which use the Wan 2.1 VAE at one frame).

    from taesd.integrations.diffusers.video import TaehvVAE
    pipe.vae = TaehvVAE.from_file("taew2_1.pth", "taew2_1")

Contract: diffusers' video layout ``N x C x T x H x W`` in [-1, 1]; ``decode(latents)`` returns
``.sample``, ``encode(videos)`` returns ``.latents``. TAEHV's latents are the diffusion model's own
(normalised) latents, so the config makes the pipelines' conversion the identity: ``latents_mean``
0, ``latents_std`` 1 (``latents / (1 / std) + mean``), ``scaling_factor`` 1. The pipelines' scale
factors come from ``scale_factor_spatial`` / ``scale_factor_temporal`` (Wan) and the length of
``temperal_downsample`` [sic] (Qwen Image: 2 ** 3 = 8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from taesd.registry import get_video_variant
from taesd.video import TAEHV, load
from taesd.video.fast import make_fast


@dataclass
class TaehvEncoderOutput(BaseOutput):
    latents: torch.Tensor


class TaehvVAE(ModelMixin, ConfigMixin):
    """A TAEHV variant behind diffusers' video-VAE interface (see the module docstring)."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, taehv_variant: str = "taew2_1", chunk: int | None = None, fast: bool = True,
                 **_ignored):
        super().__init__()
        v = get_video_variant(taehv_variant)
        self.register_to_config(
            taehv_variant=v.name, z_dim=v.latent_channels, latent_channels=v.latent_channels,
            latents_mean=[0.0] * v.latent_channels, latents_std=[1.0] * v.latent_channels,
            scaling_factor=1.0, shift_factor=0.0, scale_factor_spatial=v.downscale,
            scale_factor_temporal=v.time_downscale, temperal_downsample=list(v.encoder_time_downscale),
            in_channels=v.image_channels, out_channels=v.image_channels)
        self.taehv = TAEHV(v).eval()
        # len() is what Qwen Image reads: 2 ** len == the spatial factor
        self.temperal_downsample = [True] * int(math.log2(v.downscale))
        self.chunk, self.fast = chunk, fast
        self._ready = False
        self.requires_grad_(False)

    @classmethod
    def from_file(cls, path, variant: str | None = None, chunk: int | None = None) -> TaehvVAE:
        """From a published ``.pth`` / ``.safetensors`` (``variant`` where the shapes are shared)."""
        model = load(path, variant=variant, fast=False)
        vae = cls(taehv_variant=model.variant.name, chunk=chunk)
        vae.taehv.load_state_dict(model.state_dict())
        return vae.eval()

    def _model(self) -> TAEHV:
        if not self._ready:
            if self.fast and next(self.taehv.parameters()).device.type == "cpu":
                make_fast(self.taehv)
            self._ready = True
        return self.taehv

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Videos ``N x 3 x T x H x W`` (or images ``N x 3 x H x W``) in [-1, 1] -> latents NCTHW."""
        model = self._model()
        frames = (x[:, :, None] if x.ndim == 4 else x).transpose(1, 2).to(next(model.parameters()).dtype)
        z = model.encode(frames.add(1).div(2), chunk=self.chunk).transpose(1, 2).to(x.dtype)
        return TaehvEncoderOutput(latents=z) if return_dict else (z,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, **_):
        """Latents NCTHW -> videos ``N x 3 x T x H x W`` in [-1, 1]."""
        model = self._model()
        latents = z.transpose(1, 2).to(next(model.parameters()).dtype)
        chunk = None if self.chunk is None else max(1, self.chunk // model.time_upscale)
        video = model.decode(latents, chunk=chunk).mul(2).sub(1).transpose(1, 2).to(z.dtype)
        return DecoderOutput(sample=video) if return_dict else (video,)
