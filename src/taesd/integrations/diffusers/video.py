"""``TaehvVAE``: a TAEHV variant as a diffusers VAE, a drop-in ``pipe.vae`` for the pipelines of the
video VAEs it shares a latent space with (see ``video_contracts``):

    from taesd.integrations.diffusers.video import use_taehv_vae
    use_taehv_vae(pipe, "taew2_1.pth")                        # the variant is checked against the pipeline
    pipe.vae = TaehvVAE.from_file("taehv.pth", "taehv")       # or by hand

  WanPipeline (+ I2V, V2V, VACE)     taew2_1 / taew2_2      QwenImagePipeline (+ Edit)  taew2_1, one frame
  Krea2Pipeline                      taew2_1, one frame     HunyuanVideoPipeline        taehv
  HunyuanVideo15Pipeline             taehv1_5(_super)       LTX2Pipeline                taeltx_2 / taeltx2_3
  CogVideoXPipeline                  taecvx

Contract: diffusers' video layout ``N x C x T x H x W`` in [-1, 1]; ``decode(latents)`` returns
``.sample`` (LTX-2's ``decode(latents, timestep, ...)`` included: TAEHV has no timestep), ``encode``
returns ``.latents``. The config holds every constant those pipelines read, set so that each
pipeline's own conversion hands TAEHV the space it speaks: mean 0 / std 1 / ``scaling_factor`` 1
(the identity) where that is the diffusion model's latent, and the checkpoint's ``scaling_factor``
for CogVideoX (TAECVX speaks the VAE's raw latent). The pipelines' scale factors come from
``scale_factor_spatial/temporal`` (Wan), the length of ``temperal_downsample`` [sic] (Qwen Image,
Krea 2: 2 ** 3 = 8), ``spatial/temporal_compression_ratio`` (HunyuanVideo, LTX-2) and the length of
``block_out_channels`` (CogVideoX: 2 ** (4 - 1) = 8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from taesd.errors import TaesdError
from taesd.integrations.diffusers.video_contracts import (
    VideoContract,
    contract_for,
    contract_of_variant,
    vae_class_default,
)
from taesd.registry import get_video_variant
from taesd.video import TAEHV, identify_video, load, read_state_dict
from taesd.video.fast import make_fast

# CogVideoX's scaling_factor as AutoencoderKLCogVideoX defaults it (CogVideoX-2B); 5B and 1.5 use 0.7
COGVIDEOX_SCALING = 1.15258426
TILING_CHUNK = 32   # video frames per step once ``enable_tiling`` asks for bounded memory


@dataclass
class TaehvEncoderOutput(BaseOutput):
    latents: torch.Tensor


class TaehvVAE(ModelMixin, ConfigMixin):
    """A TAEHV variant behind diffusers' video-VAE interface (see the module docstring).

    scaling_factor: only for variants that speak the raw latent (taecvx): the checkpoint's (CogVideoX-5B
      and 1.5: 0.7); default the VAE class's. Model-space variants always get 1.
    chunk: video frames per step, encoding and decoding (bounded memory; None: the whole clip at once).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, taehv_variant: str = "taew2_1", chunk: int | None = None, fast: bool = True,
                 scaling_factor: float | None = None, **_ignored):
        super().__init__()
        v = get_video_variant(taehv_variant)
        try:
            raw = contract_of_variant(v.name).space == "raw"
        except TaesdError:   # no diffusers pipeline yet (taeos1_3, taeh3): the model's own latents
            raw = False
        if raw:
            default = vae_class_default(contract_of_variant(v.name), "scaling_factor", COGVIDEOX_SCALING)
            scaling_factor = scaling_factor or default
        elif scaling_factor not in (None, 1, 1.0):
            raise TaesdError(f"{v.name} speaks the diffusion model's own latents: its scaling_factor is 1, "
                             f"not {scaling_factor}; leave scaling_factor unset")
        c, levels = v.latent_channels, int(math.log2(v.downscale))
        self.register_to_config(
            taehv_variant=v.name, scaling_factor=float(scaling_factor or 1.0), shift_factor=0.0,
            z_dim=c, latent_channels=c, latents_mean=[0.0] * c, latents_std=[1.0] * c,
            in_channels=v.image_channels, out_channels=v.image_channels,
            scale_factor_spatial=v.downscale, scale_factor_temporal=v.time_downscale,
            spatial_compression_ratio=v.downscale, temporal_compression_ratio=v.time_downscale,
            temperal_downsample=list(v.encoder_time_downscale), block_out_channels=[64] * (levels + 1),
            timestep_conditioning=False, patch_size=1, patch_size_t=1)
        self.taehv = TAEHV(v).eval()
        # what the pipelines read as attributes rather than config entries
        self.temperal_downsample = [True] * levels          # Qwen Image, Krea 2: 2 ** len == 8
        self.spatial_compression_ratio, self.temporal_compression_ratio = v.downscale, v.time_downscale
        self.chunk, self.fast, self.tile_size = chunk, fast, None
        self._ready = False
        self.requires_grad_(False)

    @classmethod
    def from_file(cls, path, variant: str | None = None, chunk: int | None = None, fast: bool = True,
                  scaling_factor: float | None = None) -> TaehvVAE:
        """From a published ``.pth`` / ``.safetensors`` (``variant`` where the shapes are shared)."""
        return cls.from_taehv(load(path, variant=variant, fast=False), chunk, fast, scaling_factor)

    @classmethod
    def from_taehv(cls, model: TAEHV, chunk: int | None = None, fast: bool = True,
                   scaling_factor: float | None = None) -> TaehvVAE:
        """From a loaded ``TAEHV`` (its weights are copied; load it with ``fast=False``)."""
        vae = cls(taehv_variant=model.variant.name, chunk=chunk, fast=fast, scaling_factor=scaling_factor)
        vae.taehv.load_state_dict(model.state_dict())
        p = next(model.parameters())
        if (p.device.type, p.dtype) != ("cpu", torch.float32):
            torch.nn.Module.to(vae, p.device, p.dtype)   # (ModelMixin.to warns about fp32 modules we lack)
        return vae.eval()

    # LTX-2 reads the statistics as tensors, the others as config lists (a property outranks the
    # config fallback of ModelMixin's __getattr__, a buffer would not)
    @property
    def latents_mean(self) -> torch.Tensor:
        return torch.tensor(self.config.latents_mean)

    @property
    def latents_std(self) -> torch.Tensor:
        return torch.tensor(self.config.latents_std)

    def _model(self) -> TAEHV:
        if not self._ready:
            if self.fast and next(self.taehv.parameters()).device.type == "cpu":
                make_fast(self.taehv)
            self._ready = True
        return self.taehv

    # --- what AutoencoderMixin offers the pipelines' examples ------------------------------------------
    def enable_tiling(self, *_, tile_size: int | None = None, **__) -> None:
        """Bounded memory: TAEHV runs ``TILING_CHUNK`` frames per step and, with ``tile_size`` (latent
        pixels), each step in seam-exact spatial tiles (the same pixels either way)."""
        self.chunk = self.chunk or TILING_CHUNK
        self.tile_size = tile_size

    def disable_tiling(self) -> None:
        self.chunk, self.tile_size = None, None

    def enable_slicing(self) -> None:   # one batch, one pass: nothing to slice
        pass

    def disable_slicing(self) -> None:
        pass

    # --- the interface -----------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Videos ``N x 3 x T x H x W`` (or images ``N x 3 x H x W``) in [-1, 1] -> latents NCTHW."""
        model = self._model()
        frames = (x[:, :, None] if x.ndim == 4 else x).transpose(1, 2).to(next(model.parameters()).dtype)
        d, tile = model.variant.downscale, self.tile_size   # tiles need whole latents
        tile = tile if frames.shape[-2] % d == 0 and frames.shape[-1] % d == 0 else None
        z = model.encode(frames.add(1).div(2), chunk=self.chunk, tile_size=tile).transpose(1, 2).to(x.dtype)
        return TaehvEncoderOutput(latents=z) if return_dict else (z,)

    def decode(self, z: torch.Tensor, temb: torch.Tensor | None = None, return_dict: bool = True, **_):
        """Latents NCTHW -> videos ``N x 3 x T x H x W`` in [-1, 1]. ``temb`` (LTX-2's decode
        timestep) is accepted and unused; a bool there is ``return_dict`` passed by position."""
        if isinstance(temb, bool):
            return_dict = temb
        model = self._model()
        latents = z.transpose(1, 2).to(next(model.parameters()).dtype)
        chunk = None if self.chunk is None else max(1, self.chunk // model.time_upscale)
        video = model.decode(latents, chunk=chunk, tile_size=self.tile_size)
        video = video.mul(2).sub(1).transpose(1, 2).to(z.dtype)
        return DecoderOutput(sample=video) if return_dict else (video,)


def load_for(contract: VideoContract, path, variant: str | None = None) -> TAEHV:
    """A TAEHV file for a pipeline family, plain (not fast). taehv, taew2_1, taecvx and taeos1_3 share
    every shape: unless ``variant`` says otherwise, the family says which."""
    if variant is None:
        fits = [v for v in identify_video(read_state_dict(path)) if v in contract.variants]
        variant = fits[0] if len(fits) == 1 else None
    return load(path, variant=variant, fast=False)


def use_taehv_vae(pipe, model, variant: str | None = None, chunk: int | None = None, fast: bool = True):
    """Replace ``pipe.vae`` with TAEHV; ``model``: a file, a loaded ``TAEHV`` or a ``TaehvVAE``. The
    variant must speak the pipeline's latents (a file whose shapes several variants share is read as
    the pipeline's); for a raw-space variant (taecvx) the scaling factor is
    carried over from the VAE being replaced. Returns ``pipe``."""
    if isinstance(model, TaehvVAE):
        vae = model
    else:
        contract = contract_for(pipe)
        old = getattr(getattr(pipe, "vae", None), "config", None)
        scaling = getattr(old, "scaling_factor", None) if contract.space == "raw" else None
        taehv = model if isinstance(model, TAEHV) else load_for(contract, model, variant)
        vae = TaehvVAE.from_taehv(taehv, chunk=chunk, fast=fast, scaling_factor=scaling)
    contract_for(pipe, vae.config.taehv_variant)   # refuses a variant of another latent space
    pipe.vae = vae
    return pipe
