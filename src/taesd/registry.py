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


# --- Video variants: the TAEHV family (madebyollin/taehv) -------------------------------------------------
# A separate record: these networks run on clips (N x T x C x H x W) with temporal state, so they are built by
# taesd.nn.taehv and run by taesd.video.TAEHV, never by TAESD. Facts from taehv.py at TAEHV_GITHUB_COMMIT
# (and at TAEHV_WIDE_COMMIT, the side branch that holds taeltx2_3_wide).

TAEHV_GITHUB = "madebyollin/taehv"
TAEHV_GITHUB_COMMIT = "1f14a568f24bf8811e0a0ac601613e04fc1581e8"   # main, "Add TAEH3 ComfyUI node links" + 1
TAEHV_WIDE_COMMIT = "32ac0146b11007cda5a57b60a3b35653361fb8a4"     # branch 2026_03_11_taeltx23_wide

# Git blob ids (sha1 of "blob <size>\0" + bytes) of each file at its pinned commit, read from the repository
# tree: they pin the bytes as well as a sha256 does. sha256 itself is unknown here (no TAEHV weights reach
# this project's machines): recorded on first download.
TAEHV_GIT_BLOBS = {
    "taecvx.pth": "faf18249d011f1188d28ac3dbcca7d91316baef2",
    "taeh3.pth": "8c459d15868be182ca52f95c82410767e06ef510",
    "taehv.pth": "e1409542548a72fe9259cc6dc92f0504555616c4",
    "taehv1_5.pth": "73960d2af787dd8e05c9e1df93da27dc0c32deb3",
    "taehv1_5_super.pth": "b69a23b4db996fe47ca75371a0f840b5def1ce83",
    "taeltx2_3.pth": "d1b7ab9b7e106aed3b1ca907dc3ec02ef8e61005",
    "taeltx_2.pth": "415c1d34395097beed07efe5b3b9432771b02d70",
    "taeos1_3.pth": "932cae63cf7c1f0cbfb37a35cce233e154dd044b",
    "taew2_1.pth": "d6ffa27358914606153bbb790bd1da1c5cf822fd",
    "taew2_2.pth": "4b51ee2578346051cb091d6280213927b9403d61",
    "taew2_2_super.pth": "88641133a999bd6a9f4aa17a41d2bc9b6241d077",
    "taeltx2_3_wide.pth": "1da8954033693369aa34de1840dc0fad00fe7d46",
    "safetensors/taecvx.safetensors": "64e2fd755c9356db4c5c1e24d4a67135640a1085",
    "safetensors/taeh3.safetensors": "9eff5f6da1f0baa60ede7f097507119b1488219f",
    "safetensors/taehv.safetensors": "373253e5f877b3f6474a7ec874e5559f40381246",
    "safetensors/taehv1_5.safetensors": "ede3340b89ae7c58c3e203d1872b8c595c604169",
    "safetensors/taehv1_5_super.safetensors": "28a4a5a7aca3f3e0416082d1c400d206a0478377",
    "safetensors/taeltx2_3.safetensors": "9553c906cd3d2a1deb85574d5236d256d795aa50",
    "safetensors/taeltx_2.safetensors": "a3b56beaa4c3d5478cdcb78d984e65b2ad44bffa",
    "safetensors/taeos1_3.safetensors": "599c53e7f43c8e439cca31c68eed1c68855d12a4",
    "safetensors/taew2_1.safetensors": "ec1a2be453a250aa406e912bb630c34463ba0b2f",
    "safetensors/taew2_2.safetensors": "9d0ef19504c0b918eb6a8efea1ed8596cf666400",
    "safetensors/taew2_2_super.safetensors": "f13f912d19f81eb742ba784a04d1cc228e1ce287",
    "safetensors/taeltx2_3_wide.safetensors": "c48ef97dadf1cb9fa81eb836d21426a6e76c57d9",
}


@dataclass(frozen=True, kw_only=True)
class VideoVariant:
    """One published TAEHV weight set: a video VAE's latent space and the network that speaks it.

    Both parts live in one file with keys ``encoder.N.*`` / ``decoder.N.*`` (N: the index in the
    published ``nn.Sequential``), as ``<name>.pth`` and ``safetensors/<name>.safetensors``.
    """
    name: str
    family: str                        # the video VAE whose latents this speaks
    serves: tuple[str, ...]            # the diffusion models that use that VAE
    latent_channels: int
    patch_size: int = 1                # pixel (un)shuffle around the network: 1, 2 or 4
    encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False)   # the three TPool stages
    decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True)     # the three TGrow stages
    decoder_block: str = "mem"         # "mem" (MemBlock) | "super" (7x7 depthwise + PixelShuffle) | "wide"
    trim: str = "causal"               # "causal": drop t_up - 1 leading frames | "cogvideox" | "h3"
    sources: tuple[WeightFile, ...] = ()
    image_channels: int = 3
    downscale: int = 8                 # image pixels per latent pixel (8 x patch_size)

    @property
    def time_downscale(self) -> int:
        return 2 ** sum(self.encoder_time_downscale)

    @property
    def time_upscale(self) -> int:
        return 2 ** sum(self.decoder_time_upscale)


def _taehv_files(name: str, revision: str = TAEHV_GITHUB_COMMIT) -> tuple[WeightFile, ...]:
    """``<name>.pth`` at the root and ``safetensors/<name>.safetensors``, both parts in one file each."""
    return tuple(WeightFile(host="github", repo=TAEHV_GITHUB, filename=f, layout="taehv", parts=PARTS,
                            revision=revision) for f in (f"{name}.pth", f"safetensors/{name}.safetensors"))


def _video(name: str, family: str, serves: tuple[str, ...], channels: int, patch: int = 1,
           **kw) -> VideoVariant:
    revision = kw.pop("revision", TAEHV_GITHUB_COMMIT)
    return VideoVariant(name=name, family=family, serves=serves, latent_channels=channels, patch_size=patch,
                        downscale=8 * patch, sources=_taehv_files(name, revision), **kw)


_LTX = dict(encoder_time_downscale=(True, True, True), decoder_time_upscale=(True, True, True))

VIDEO_VARIANTS: dict[str, VideoVariant] = {v.name: v for v in [
    _video("taehv", "HunyuanVideo", ("HunyuanVideo",), 16),
    _video("taew2_1", "Wan 2.1", ("Wan 2.1", "Wan 2.2 14B", "Qwen Image", "Qwen Image Edit", "Krea 2"), 16),
    _video("taew2_2", "Wan 2.2 (5B)", ("Wan 2.2 5B",), 48, 2),
    _video("taew2_2_super", "Wan 2.2 (5B)", ("Wan 2.2 5B",), 48, 2, decoder_block="super"),
    _video("taehv1_5", "HunyuanVideo 1.5", ("HunyuanVideo 1.5",), 32, 2),
    _video("taehv1_5_super", "HunyuanVideo 1.5", ("HunyuanVideo 1.5",), 32, 2, decoder_block="super"),
    _video("taeh3", "MiniMax H3", ("MiniMax H3",), 24, 2, trim="h3"),
    _video("taecvx", "CogVideoX", ("CogVideoX",), 16, trim="cogvideox"),
    _video("taeos1_3", "Open-Sora 1.3", ("Open-Sora 1.3",), 16),
    _video("taeltx_2", "LTX-2", ("LTX-2",), 128, 4, **_LTX),
    _video("taeltx2_3", "LTX-2.3", ("LTX-2.3", "LTX-2.5"), 128, 4, **_LTX),
    _video("taeltx2_3_wide", "LTX-2.3", ("LTX-2.3", "LTX-2.5"), 128, 4, decoder_block="wide",
           revision=TAEHV_WIDE_COMMIT, **_LTX),
]}


def get_video_variant(name: str | VideoVariant) -> VideoVariant:
    if isinstance(name, VideoVariant):
        return name
    key = str(name).lower().strip()
    if key not in VIDEO_VARIANTS:
        raise TaesdError(f"unknown video variant {name!r}; choose one of: {', '.join(VIDEO_VARIANTS)}")
    return VIDEO_VARIANTS[key]
