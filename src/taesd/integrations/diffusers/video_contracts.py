"""Video latent contracts: for each diffusers pipeline that a TAEHV variant serves, which latents TAEHV
speaks, how the pipeline hands them to its VAE, and how they sit in its denoising loop.

Two spaces per family:
  model  the latent the diffusion model denoises (what ``output_type="latent"`` returns, but for
         LTX-2, which returns it denormalised with its VAE's constants: the identity on TaehvVAE);
         upstream: "TAEHV encodes / decodes exactly what diffusion models use"
  raw    what the family's big VAE decodes: the pipeline's conversion of the model latent with the
         VAE's constants (``scaling_factor``, ``latents_mean`` / ``latents_std``)

TAEHV speaks the model space for every family but CogVideoX: upstream's own CogVideoX example divides
the pipeline's latents by the VAE's ``scaling_factor`` (0.7 for CogVideoX-5B / 1.5) before TAECVX, so
TAECVX speaks the VAE's raw latents. ``TaehvVAE`` sets its config so that each pipeline's own
conversion hands it exactly the space its variant speaks: the identity (mean 0, std 1, scaling 1)
for model-space families, the checkpoint's ``scaling_factor`` for CogVideoX.

Layouts of the latent in the denoising loop (what ``callback_on_step_end`` sees):
  ncthw     N x C x T x h x w                                         (Wan, HunyuanVideo, 1.5)
  ntchw     N x T x C x h x w                                         (CogVideoX)
  patches   2x2 patches in a sequence, N x (h/2 * w/2) x 4C, one frame  (Qwen Image, Krea 2)
  sequence  N x (T * h * w) x C, patch size 1                          (LTX-2)
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from taesd.errors import TaesdError


@dataclass(frozen=True)
class VideoContract:
    family: str
    pipelines: tuple[str, ...]      # diffusers pipeline class-name prefixes of the family
    variants: tuple[str, ...]       # the TAEHV variants that speak its latents (the first: the default)
    vae_class: str                  # the family's VAE class in diffusers
    conversion: str                 # the pipeline's own model -> raw conversion, as its code writes it
    space: str = "model"            # what TAEHV speaks: "model" | "raw"
    layout: str = "ncthw"           # "ncthw" | "ntchw" | "patches" | "sequence"
    excludes: tuple[str, ...] = ()  # prefixes of pipelines of other latent spaces (Qwen Image 2.1)

    @property
    def variant(self) -> str:
        return self.variants[0]


CONTRACTS: tuple[VideoContract, ...] = (
    VideoContract("Wan", ("Wan",), ("taew2_1", "taew2_2", "taew2_2_super"), "AutoencoderKLWan",
                  "latents / (1 / latents_std) + latents_mean"),
    VideoContract("Qwen Image", ("QwenImage",), ("taew2_1",), "AutoencoderKLQwenImage",
                  "unpack 2x2, then latents / (1 / latents_std) + latents_mean", layout="patches",
                  excludes=("QwenImage21", "QwenImageLayered")),
    VideoContract("Krea 2", ("Krea2",), ("taew2_1",), "AutoencoderKLQwenImage",
                  "unpack 2x2, then latents / (1 / latents_std) + latents_mean", layout="patches"),
    VideoContract("HunyuanVideo 1.5", ("HunyuanVideo15",), ("taehv1_5", "taehv1_5_super"),
                  "AutoencoderKLHunyuanVideo15", "latents / scaling_factor"),
    VideoContract("HunyuanVideo", ("HunyuanVideo", "HunyuanSkyreels"), ("taehv",),
                  "AutoencoderKLHunyuanVideo", "latents / scaling_factor"),
    VideoContract("LTX-2", ("LTX2",), ("taeltx_2", "taeltx2_3", "taeltx2_3_wide"), "AutoencoderKLLTX2Video",
                  "unpack, then latents * latents_std / scaling_factor + latents_mean", layout="sequence"),
    VideoContract("CogVideoX", ("CogVideoX",), ("taecvx",), "AutoencoderKLCogVideoX",
                  "NTCHW -> NCTHW, then latents / scaling_factor", space="raw", layout="ntchw"),
)


def contract_for(pipe_or_name, variant: str | None = None) -> VideoContract:
    """The contract of a pipeline (instance, class or class name); ``variant`` must speak its latents."""
    name = pipe_or_name if isinstance(pipe_or_name, str) else (
        pipe_or_name.__name__ if isinstance(pipe_or_name, type) else type(pipe_or_name).__name__)
    # longest prefix first: HunyuanVideo15 before HunyuanVideo
    matches = sorted(((p, c) for c in CONTRACTS for p in c.pipelines
                      if name.startswith(p) and not name.startswith(c.excludes)),
                     key=lambda pc: -len(pc[0]))
    if not matches:
        known = ", ".join(p for c in CONTRACTS for p in c.pipelines)
        raise TaesdError(f"no TAEHV contract for {name}; the video pipelines served are {known}")
    contract = matches[0][1]
    if variant is not None and variant not in contract.variants:
        raise TaesdError(f"{name} makes {contract.family} latents, which {variant} does not speak; "
                         f"use one of {', '.join(contract.variants)}")
    return contract


def contract_of_variant(variant: str) -> VideoContract:
    """The first contract whose latents ``variant`` speaks (taew2_1: Wan)."""
    for c in CONTRACTS:
        if variant in c.variants:
            return c
    raise TaesdError(f"no diffusers pipeline served by {variant} (the served variants: "
                     f"{', '.join(sorted({v for c in CONTRACTS for v in c.variants}))})")


def vae_class_default(contract: VideoContract, name: str, fallback: float) -> float:
    """A constant as the family's VAE class in the installed diffusers defaults it (e.g. CogVideoX's
    ``scaling_factor``); ``fallback`` where that class is absent."""
    import diffusers
    cls = getattr(diffusers, contract.vae_class, None)
    if cls is None:
        return fallback
    p = inspect.signature(cls.__init__).parameters.get(name)
    return fallback if p is None or p.default is inspect.Parameter.empty else float(p.default)


def to_taehv(latents: torch.Tensor, contract: VideoContract, *, scaling_factor: float = 1.0,
             grid: tuple[int, int, int] | None = None) -> torch.Tensor:
    """A denoising-loop latent (the pipeline's layout, model space; or, for the packed layouts, the
    pipeline's unpacked N x C x T x h x w) -> TAEHV's input, N x T x C x h x w.

    ``grid``: ``(T, h, w)`` in latent pixels, needed for the packed layouts (``patches``: T = 1).
    ``scaling_factor``: the pipeline's VAE's, used where TAEHV speaks the raw space (CogVideoX).
    """
    if contract.layout == "ncthw" or (latents.ndim == 5 and contract.layout != "ntchw"):
        z = latents.transpose(1, 2)   # also the packed families' unpacked N x C x T x h x w
    elif contract.layout == "ntchw":
        z = latents
    elif grid is None:
        raise TaesdError(f"{contract.family} latents are packed into a sequence; pass the latent grid "
                         f"(frames, height, width) or the pipeline's height/width to unpack them")
    elif contract.layout == "patches":
        _, h, w = grid
        n, _, c4 = latents.shape
        z = latents.reshape(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        z = z.reshape(n, c4 // 4, h, w)[:, None]
    else:  # sequence, patch size 1: N x (T h w) x C
        t, h, w = grid
        z = latents.reshape(latents.shape[0], t, h, w, -1).permute(0, 1, 4, 2, 3)
    # as the pipelines write it (1 / s * latents), so that the rounding is theirs too
    return 1 / scaling_factor * z if contract.space == "raw" else z
