"""TAESD as a diffusers pipeline's VAE, so whole generations run with the tiny decoder.

    import taesd
    from taesd.integrations.diffusers.vae import use_taesd_vae
    use_taesd_vae(pipe)                      # taesd.load() of the pipeline family's variant
    use_taesd_vae(pipe, taesd.load("taef2")) # or a model you loaded

taesd / taesdxl / taesd3 / taef1 become a diffusers ``AutoencoderTiny`` built from our weights.
Its config has scaling_factor 1 and shift_factor 0: TAESD already speaks the diffusion model's
latents, so the pipeline's ``latents / scaling_factor + shift_factor`` must be the identity.
taef2 becomes a ``Flux2TinyVAE``: it has the FLUX.2 VAE's ``bn`` with mean 0 and variance 1
(eps 0), so the pipeline's BatchNorm inverse is the identity and TAEF2 gets the normalised,
unpatchified latent it was trained on.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from taesd.integrations.diffusers.contracts import variant_for
from taesd.errors import TaesdError
from taesd.model import TAESD
from taesd.registry import get_variant
from taesd.io.weights.formats import diffusers_config, state_dicts, to_diffusers_keys
from taesd.registry import PARTS, Arch


def autoencoder_tiny(model: TAESD):
    """A diffusers ``AutoencoderTiny`` holding the weights of ``model`` (taesd/taesdxl/taesd3/taef1)."""
    from diffusers import AutoencoderTiny
    v = model.variant
    if v.arch != Arch.BASE:
        raise TaesdError(f"AutoencoderTiny cannot hold {v.name} ({v.arch} architecture); "
                         f"for FLUX.2 use Flux2TinyVAE (use_taesd_vae does this)")
    missing = [p for p in PARTS if p not in model.parts]
    if missing:
        raise TaesdError(f"AutoencoderTiny needs both parts; this {v.name} has no {missing[0]}: "
                         f"load it with parts=('encoder', 'decoder')")
    config = {k: val for k, val in diffusers_config(v).items() if not k.startswith("_")}
    vae = AutoencoderTiny.from_config(config)
    vae.load_state_dict(to_diffusers_keys(state_dicts(model)))
    return vae.to(device=model.device, dtype=model.dtype).eval().requires_grad_(False)


class _Config(dict):
    """Attribute access like diffusers' FrozenDict (pipelines read ``vae.config.batch_norm_eps``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Flux2TinyVAE(nn.Module):
    """TAEF2 behind the FLUX.2 pipeline's VAE interface (``bn``, ``config``, ``encode``, ``decode``).

    The pipeline decodes ``vae.decode(unpatchify(latents * bn_std + bn_mean))``; with mean 0,
    variance 1 and eps 0 that is exactly the unpatchified normalised latent TAEF2 takes. Images
    go in and come out in [-1, 1], like the big VAE's.
    """

    def __init__(self, model: TAESD):
        super().__init__()
        if model.variant.name != "taef2":
            raise TaesdError(f"Flux2TinyVAE wraps taef2, not {model.variant.name}")
        self.taesd = model
        channels = 4 * model.variant.latent_channels  # 2x2 patchified
        self.bn = nn.BatchNorm2d(channels, eps=0.0, affine=False, track_running_stats=True)
        self.bn.to(model.device)
        self.config = _Config(batch_norm_eps=0.0, block_out_channels=[64, 64, 64, 64],
                              latent_channels=model.variant.latent_channels, patch_size=(2, 2),
                              scaling_factor=1.0, shift_factor=0.0, force_upcast=False)
        self.eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.taesd.dtype

    @property
    def device(self) -> torch.device:
        return self.taesd.device

    def decode(self, z: torch.Tensor, return_dict: bool = True, **_):
        from diffusers.models.autoencoders.vae import DecoderOutput
        image = self.taesd.decode(z).mul(2).sub(1)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
        latents = self.taesd.encode(x.add(1).div(2).clamp(0, 1))
        return AutoencoderTinyOutput(latents=latents) if return_dict else (latents,)


def tiny_vae(model: TAESD):
    """The pipeline-VAE form of ``model``: AutoencoderTiny, or Flux2TinyVAE for taef2."""
    if model.variant.name == "taef2":
        return Flux2TinyVAE(model)
    return autoencoder_tiny(model)


def use_taesd_vae(pipe, model: TAESD | None = None, variant: str | None = None):
    """Replace ``pipe.vae`` with TAESD (loaded for the pipeline's family unless given); returns pipe."""
    expected = get_variant(variant or variant_for(pipe))
    if model is None:
        from taesd.loader import load
        vae = getattr(pipe, "vae", None)
        model = load(expected, device=getattr(vae, "device", None), dtype=getattr(vae, "dtype", None))
    elif model.variant.name != expected.name:
        # Same channel count is not enough: taesd3 and taef1 are both 16 channels, different spaces.
        raise TaesdError(f"this {type(pipe).__name__} makes {expected.name} latents "
                         f"({expected.latent_channels}-channel), not {model.variant.name} ones; load {expected.name} "
                         f"(or pass variant= if the pipeline's family was guessed wrong)")
    pipe.vae = tiny_vae(model)
    return pipe
