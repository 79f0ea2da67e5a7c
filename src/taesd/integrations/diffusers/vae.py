"""TAESD as a diffusers pipeline's VAE, so whole generations run with the tiny decoder.

    import taesd
    from taesd.integrations.diffusers.vae import use_taesd_vae
    use_taesd_vae(pipe)                      # taesd.load() of the pipeline family's variant
    use_taesd_vae(pipe, taesd.load("taef2")) # or a model you loaded (or a TaesdVAE)

Every variant becomes a ``TaesdVAE`` (taesd.integrations.diffusers.model): our network and
executor behind diffusers' VAE interface, with a config that makes the family's pipeline
conversion (scale/shift, FLUX.2's BatchNorm inverse, Qwen 2.1's mean/std) the identity. A TAESD of
another family is refused with one line, even at the same channel count (taesd3 vs taef1).

``autoencoder_tiny`` (now in ``portable``) builds diffusers' own ``AutoencoderTiny`` from our weights
(base variants): the portable form of a saved pipeline, and the comparison in benchmarks/bench_diffusers.py.
"""
from __future__ import annotations

from taesd.errors import TaesdError
from taesd.integrations.diffusers.contracts import variant_for
from taesd.integrations.diffusers.portable import autoencoder_tiny  # noqa: F401  (its older home)
from taesd.model import TAESD
from taesd.registry import get_variant
from taesd.runtime.dtypes import default_dtype


def tiny_vae(model):
    """The pipeline-VAE form of ``model`` (a TAESD, or a TaesdVAE returned as it is)."""
    from taesd.integrations.diffusers.model import TaesdVAE
    return model if isinstance(model, TaesdVAE) else TaesdVAE.from_taesd(model)


def Flux2TinyVAE(model: TAESD):  # noqa: N802  (the class name users imported before TaesdVAE)
    """taef2 as a pipeline VAE: now a ``TaesdVAE`` (kept so existing imports work)."""
    if model.variant.name != "taef2":
        raise TaesdError(f"Flux2TinyVAE wraps taef2, not {model.variant.name}")
    return tiny_vae(model)


def use_taesd_vae(pipe, model=None, variant: str | None = None):
    """Replace ``pipe.vae`` with TAESD (loaded for the pipeline's family unless given); returns pipe."""
    expected = get_variant(variant or variant_for(pipe))
    if model is None:
        from taesd.integrations.diffusers.model import TaesdVAE
        from taesd.loader import load
        vae = getattr(pipe, "vae", None)
        device, dtype = getattr(vae, "device", None), getattr(vae, "dtype", None)
        if dtype is not None and dtype == default_dtype(device):
            # the pipeline's dtype is the rule's: no dtype asked (AMX and AVX-512-BF16 CPUs compute in bf16)
            dtype = None
        model = load(expected, device=device, dtype=dtype)
        model = TaesdVAE.from_taesd(model, share=True)   # ours alone: keep its executor, no copy
    have = model.variant
    if have.name != expected.name:
        # Same channel count is not enough: taesd3 and taef1 are both 16 channels, different spaces.
        raise TaesdError(f"this {type(pipe).__name__} makes {expected.name} latents "
                         f"({expected.latent_channels}-channel), not {have.name} ones; load {expected.name} "
                         f"(or pass variant= if the pipeline's family was guessed wrong)")
    pipe.vae = tiny_vae(model)
    return pipe
