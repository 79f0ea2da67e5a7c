"""The registry of published TAESD variants: the one place every other module asks.

A variant names a latent space (the diffusion model family it belongs to), the architecture that
maps images to it, and where its published weights live.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import TaesdError


@dataclass(frozen=True)
class Variant:
    name: str
    family: str            # diffusion model family whose latents this variant speaks
    latent_channels: int
    image_channels: int    # 3 (RGB) or 4 (RGBA, straight alpha)
    downscale: int         # image pixels per latent pixel along one side
    arch: str              # "base" | "base+pool" | "f32" | "f16"
    # How the paired model's raw VAE latents relate to TAESD's: taesd = (raw - shift) * scale.
    vae_scale: float = 1.0
    vae_shift: float = 0.0
    hub_repo: str | None = None          # Hugging Face repo with a diffusers-format copy
    hub_files: tuple[str, ...] = field(default=())
    description: str = ""

    @property
    def encoder_file(self) -> str:
        return f"{self.name}_encoder.pth"

    @property
    def decoder_file(self) -> str:
        return f"{self.name}_decoder.pth"


_DIFFUSERS_FILES = ("config.json", "diffusion_pytorch_model.safetensors")

VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("taesd", "SD 1.x / 2.x", 4, 3, 8, "base", 0.18215, 0.0,
            "madebyollin/taesd", _DIFFUSERS_FILES, "Stable Diffusion 1.x and 2.x"),
    Variant("taesdxl", "SDXL", 4, 3, 8, "base", 0.13025, 0.0,
            "madebyollin/taesdxl", _DIFFUSERS_FILES, "Stable Diffusion XL"),
    Variant("taesd3", "SD3 / SD3.5", 16, 3, 8, "base", 1.5305, 0.0609,
            "madebyollin/taesd3", _DIFFUSERS_FILES, "Stable Diffusion 3 and 3.5"),
    Variant("taef1", "FLUX.1", 16, 3, 8, "base", 0.3611, 0.1159,
            "madebyollin/taef1", _DIFFUSERS_FILES, "FLUX.1 (also HiDream, Z-Image)"),
    Variant("taef2", "FLUX.2", 32, 3, 8, "base+pool", 1.0, 0.0,
            None, (), "FLUX.2 (BatchNorm-normalised, unpatchified latents)"),
    Variant("taesana", "Sana (DC-AE f32c32)", 32, 3, 32, "f32", 0.41407, 0.0,
            None, (), "Sana's DC-AE f32c32"),
    Variant("taeqi2_1", "Qwen Image 2.1", 64, 4, 16, "f16", 1.0, 0.0,
            None, (), "Qwen Image 2.1 (RGBA images)"),
]}


def get_variant(name: "str | Variant") -> Variant:
    if isinstance(name, Variant):
        return name
    key = str(name).lower().strip()
    if key not in VARIANTS:
        raise TaesdError(f"unknown variant {name!r}; choose one of: {', '.join(VARIANTS)}")
    return VARIANTS[key]


def list_variants() -> list[Variant]:
    return list(VARIANTS.values())
