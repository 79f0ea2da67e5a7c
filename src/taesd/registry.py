"""The registry of published TAESD variants: the one place that holds per-variant facts.

A variant names a latent space (the diffusion model family it belongs to), the architecture that
maps images to it, how the family's pipelines hand latents to their VAE (the latent contract), and
where its published weights live. Every other module asks here; nothing else keeps per-variant
constants.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
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

    @property
    def companions(self) -> tuple[str, ...]:
        """Files fetched beside this one: a diffusers folder's config.json."""
        return ("config.json",) if self.layout == "diffusers" else ()

    def at(self, revision: str | None) -> WeightFile:
        """This file at another revision (its recorded sha256 and size then no longer apply)."""
        if not revision or revision == self.revision:
            return self
        return replace(self, revision=revision, sha256=None, size=None)


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
        return self.part_file("encoder")

    @property
    def decoder_file(self) -> str:
        return self.part_file("decoder")

    def part_file(self, part: str) -> str:
        """The published ``<name>_<part>.pth`` name: the one place it is made."""
        return f"{self.name}_{part}.pth"


TAESD_GITHUB = "madebyollin/taesd"
# The commit of madebyollin/taesd that added FLUX.2 (5cccb12, "Add support for FLUX.2 VAE"): the newest one
# holding every published .pth but taeqi2_1's; each file's last change is at or before it (TAEF1 1.1: 899155b,
# TAESD 1.3: 7f572ca). A pinned commit pins the bytes: files were replaced in place between versions.
TAESD_GITHUB_COMMIT = "5cccb12dc72074a4be35680c3b108548a7c69978"

# sha256 of the .pth files at that commit. taef2 and the taesana encoder: ../shared/weights/SHA256SUMS. The
# others: a public Nix manifest of the raw/main files, which agrees with SHA256SUMS on all three of those.
GITHUB_SHA256 = {
    "taesd_encoder.pth": "15bc6128f0ac51c673d3427216082ebfa62402ffc89763af74edfe259b32d49d",
    "taesd_decoder.pth": "02873377c3f4659cd9f9adb2f718dcb434ba4c7bba3af3ee7bb95cbdabe2d3cf",
    "taesdxl_encoder.pth": "a5648de089aba6b641e505c0f132b2dc7ff70ab6070c31be5e624e807e711c5e",
    "taesdxl_decoder.pth": "a3956b8a7a763f251c7357aad6375dacdb6d971121c73e97a3069fc33a94fe1e",
    "taesd3_encoder.pth": "b8fefa64b92a867df673c7f22fb2cbc6ae144070e22e7a0b3af0f21de2f43f92",
    "taesd3_decoder.pth": "178fbb90c8c3bab4fe5e30dcba3b85d8bd2c9a203f71239c3a3223720c310b58",
    "taef1_encoder.pth": "1d1ad34546aea0edd99dc2db9411d870319f428ced5065c6464582c17c070536",
    "taef1_decoder.pth": "beae86f2eeaf0cea884dc8ffe639fb297dac8c984441bb53420f07d767785104",
    "taef2_encoder.pth": "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
    "taef2_decoder.pth": "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5",
    "taesana_encoder.pth": "858f4e4cc293f88efaf58107f4154b960b9ced0cb5d9c050dad11f926b618c1f",
    "taesana_decoder.pth": "3eb733ab918dd5840fa6e6309642edb49359bd1c7624d9e5884f92438aa07c36",
}
GITHUB_SIZE = {"taef2_encoder.pth": 2_704_692, "taef2_decoder.pth": 2_704_756,
               "taesana_encoder.pth": 2_537_004}


def _github(name: str, revision: str = TAESD_GITHUB_COMMIT) -> tuple[WeightFile, ...]:
    """The published ``<name>_<part>.pth`` files of the GitHub repository."""
    files = [f"{name}_{p}.pth" for p in PARTS]
    return tuple(WeightFile(host="github", repo=TAESD_GITHUB, filename=f, layout="pth", parts=(p,),
                            revision=revision, sha256=GITHUB_SHA256.get(f) if revision == TAESD_GITHUB_COMMIT
                            else None, size=GITHUB_SIZE.get(f)) for p, f in zip(PARTS, files))


def _hub_diffusers(name: str) -> WeightFile:
    """An AutoencoderTiny folder on the hub (config.json beside the weights)."""
    return WeightFile(host="hub", repo=f"madebyollin/{name}", filename="diffusion_pytorch_model.safetensors",
                      layout="diffusers", parts=PARTS)


def _hub_combined(name: str) -> WeightFile:
    """One safetensors file on the hub with both parts in diffusers-style keys."""
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
            sources=(_hub_combined("taef2"), *_github("taef2"))),
    # Sana's DC-AE f32c32 (mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers) scales by 0.41407; the
    # published taesana encoder's latents have unit spread (std ~0.9 on photos): the scaled latent.
    Variant(name="taesana", family="Sana (DC-AE f32c32)", description="Sana's DC-AE f32c32",
            arch=Arch.F32, latent_channels=32, downscale=32, vae_scale=0.41407,
            pipelines=("Sana",), vae_classes=("AutoencoderDC",),
            sources=_github("taesana")),   # the GitHub files are the only home of the taesana decoder
    Variant(name="taeqi2_1", family="Qwen Image 2.1", description="Qwen Image 2.1 (RGBA images)",
            arch=Arch.F16, latent_channels=64, image_channels=4, downscale=16, normalization="mean_std",
            packing="sequence", pipelines=("QwenImage21",), vae_classes=("AutoencoderKLQwenImage21",),
            # Its .pth files came after the pinned commit: unpinned ("main"), hashed at the first download.
            sources=(_hub_combined("taeqi2_1"), *_github("taeqi2_1", revision="main"))),
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
