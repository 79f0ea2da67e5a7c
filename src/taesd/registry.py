"""The registry of published TAESD variants: the one place that holds per-variant facts.

A variant names a latent space (the diffusion model family it belongs to), the architecture that
maps images to it, how the family's pipelines hand latents to their VAE (the latent contract), and
where its published weights live. Every other module asks here; nothing else keeps per-variant
constants.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from taesd.errors import TaesdError

PARTS = ("encoder", "decoder")


class Arch(str, Enum):
    """The four published architectures (taesd.nn.arch builds each)."""
    BASE = "base"              # SD 1/2, SDXL, SD3, FLUX.1: 8x down, 64 channels wide
    BASE_POOL = "base+pool"    # FLUX.2: base plus a GroupNorm pool branch in the mid blocks
    F32 = "f32"                # Sana DC-AE f32c32: 32x down
    F16 = "f16"                # Qwen Image 2.1: 16x down, RGBA, pixel (un)shuffle

    def __str__(self) -> str:
        return self.value

    def __hash__(self) -> int:   # as the plain string's, so "base" and Arch.BASE are one dict key
        return str.__hash__(self)


@dataclass(frozen=True, kw_only=True)
class WeightFile:
    """One published file of a variant's weights.

    host "hub": a Hugging Face repo (``repo``, ``revision``, ``filename``; fetched with
    huggingface_hub, honouring ``HF_ENDPOINT``). host "github": ``<TAESD_GITHUB_URL>/<repo>/raw/
    <revision>/<filename>``. ``layout`` says how to read it: "pth" (one part, original keys),
    "diffusers" (an AutoencoderTiny folder: ``filename`` is its weights file, beside config.json),
    "combined" (both parts in one file with diffusers-style keys).
    """
    host: str                          # "hub" | "github"
    repo: str
    filename: str
    layout: str                        # "pth" | "diffusers" | "combined"
    parts: tuple[str, ...]             # the parts this file holds
    revision: str = "main"             # a commit pins the bytes: files were replaced in place
    sha256: str | None = None          # None: recorded at the first download, re-checked later
    size: int | None = None            # bytes, where known


@dataclass(frozen=True, kw_only=True)
class Variant:
    name: str
    family: str                        # diffusion model family whose latents this variant speaks
    description: str
    arch: Arch
    latent_channels: int
    image_channels: int = 3            # 3 (RGB) or 4 (RGBA, straight alpha)
    downscale: int = 8                 # image pixels per latent pixel along one side
    # The latent contract (taesd.integrations.diffusers.contracts): how the paired model's raw VAE
    # latents relate to TAESD's, and how its pipelines pack them.
    normalization: str = "scale_shift"  # "scale_shift" | "batchnorm" | "mean_std"
    vae_scale: float = 1.0             # scale_shift: taesd = (raw - shift) * scale
    vae_shift: float = 0.0
    packing: str = "spatial"           # "spatial" | "flux" | "flux2" | "sequence"
    pipelines: tuple[str, ...] = ()    # diffusers pipeline class-name prefixes of the family
    vae_classes: tuple[str, ...] = ()  # VAE classes that identify the family on their own
    sources: tuple[WeightFile, ...] = ()   # where the published weights live, preferred first
    # Published parameter counts (encoder, decoder): what a loaded network must have.
    num_params: tuple[int, int] | None = None

    @property
    def encoder_file(self) -> str:
        return f"{self.name}_encoder.pth"

    @property
    def decoder_file(self) -> str:
        return f"{self.name}_decoder.pth"

    def part_file(self, part: str) -> str:
        return f"{self.name}_{part}.pth"


TAESD_GITHUB = "madebyollin/taesd"


def _github(name: str, sha256: dict[str, str] | None = None, size: dict[str, int] | None = None,
            parts: tuple[str, ...] = PARTS) -> tuple[WeightFile, ...]:
    """The published ``<name>_<part>.pth`` files of the GitHub repository."""
    sha256, size = sha256 or {}, size or {}
    return tuple(WeightFile(host="github", repo=TAESD_GITHUB, filename=f"{name}_{p}.pth", layout="pth",
                            parts=(p,), sha256=sha256.get(p), size=size.get(p)) for p in parts)


def _hub_diffusers(name: str) -> WeightFile:
    return WeightFile(host="hub", repo=f"madebyollin/{name}", filename="diffusion_pytorch_model.safetensors",
                      layout="diffusers", parts=PARTS)


def _hub_combined(name: str) -> WeightFile:
    return WeightFile(host="hub", repo=f"madebyollin/{name}", filename=f"{name}.safetensors",
                      layout="combined", parts=PARTS)


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant(name="taesd", family="SD 1.x / 2.x", description="Stable Diffusion 1.x and 2.x",
            arch=Arch.BASE, latent_channels=4, vae_scale=0.18215,
            pipelines=("StableDiffusion", "LatentConsistency"),
            sources=(_hub_diffusers("taesd"), *_github("taesd")), num_params=(1_222_532, 1_222_531)),
    Variant(name="taesdxl", family="SDXL", description="Stable Diffusion XL",
            arch=Arch.BASE, latent_channels=4, vae_scale=0.13025, pipelines=("StableDiffusionXL",),
            sources=(_hub_diffusers("taesdxl"), *_github("taesdxl")), num_params=(1_222_532, 1_222_531)),
    Variant(name="taesd3", family="SD3 / SD3.5", description="Stable Diffusion 3 and 3.5",
            arch=Arch.BASE, latent_channels=16, vae_scale=1.5305, vae_shift=0.0609,
            pipelines=("StableDiffusion3",),
            sources=(_hub_diffusers("taesd3"), *_github("taesd3"))),
    Variant(name="taef1", family="FLUX.1", description="FLUX.1 (also Chroma, HiDream, Z-Image)",
            arch=Arch.BASE, latent_channels=16, vae_scale=0.3611, vae_shift=0.1159, packing="flux",
            pipelines=("Flux", "Chroma", "HiDream", "ZImage"),
            sources=(_hub_diffusers("taef1"), *_github("taef1"))),
    # FLUX.2: TAESD takes the BatchNorm-*normalised* latent, unpatchified from 128 channels at h/16
    # to 32 at h/8; the pipeline applies the BatchNorm inverse only for the big VAE.
    Variant(name="taef2", family="FLUX.2", description="FLUX.2 (BatchNorm-normalised, unpatchified latents)",
            arch=Arch.BASE_POOL, latent_channels=32, normalization="batchnorm", packing="flux2",
            pipelines=("Flux2",), vae_classes=("AutoencoderKLFlux2",),
            sources=(_hub_combined("taef2"), *_github("taef2", sha256={
                "encoder": "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
                "decoder": "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5"},
                size={"encoder": 2704692, "decoder": 2704756}))),
    # Sana's DC-AE f32c32 (mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers) scales by 0.41407; the
    # published taesana encoder's latents have unit spread (std ~0.9 on photos): the scaled latent.
    Variant(name="taesana", family="Sana (DC-AE f32c32)", description="Sana's DC-AE f32c32",
            arch=Arch.F32, latent_channels=32, downscale=32, vae_scale=0.41407,
            pipelines=("Sana",), vae_classes=("AutoencoderDC",),
            sources=_github("taesana", sha256={
                "encoder": "858f4e4cc293f88efaf58107f4154b960b9ced0cb5d9c050dad11f926b618c1f"},
                size={"encoder": 2537004})),
    Variant(name="taeqi2_1", family="Qwen Image 2.1", description="Qwen Image 2.1 (RGBA images)",
            arch=Arch.F16, latent_channels=64, image_channels=4, downscale=16, normalization="mean_std",
            packing="sequence", pipelines=("QwenImage21",), vae_classes=("AutoencoderKLQwenImage21",),
            sources=(_hub_combined("taeqi2_1"), *_github("taeqi2_1"))),
]}


def get_variant(name: str | Variant) -> Variant:
    if isinstance(name, Variant):
        return name
    key = str(name).lower().strip()
    if key not in VARIANTS:
        raise TaesdError(f"unknown variant {name!r}; choose one of: {', '.join(VARIANTS)}")
    return VARIANTS[key]


def list_variants() -> list[Variant]:
    return list(VARIANTS.values())


def normalize_parts(parts) -> tuple[str, ...]:
    """"encoder", "decoder" or a sequence of them -> a checked tuple in PARTS order."""
    items = (parts,) if isinstance(parts, str) else tuple(parts)
    bad = [p for p in items if p not in PARTS]
    if bad or not items:
        raise TaesdError(f"parts must be 'encoder', 'decoder' or both, not {parts!r}")
    return tuple(p for p in PARTS if p in items)
