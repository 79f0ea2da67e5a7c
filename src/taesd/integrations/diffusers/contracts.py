"""Latent contracts: how each diffusion model family's latents relate to its VAE and to TAESD.

Three spaces per family:
  raw       what the family's big VAE encoder returns and its decoder takes (N x C x h x w)
  taesd     what TAESD encodes to and decodes from: the latent the diffusion model works on,
            laid out spatially (N x C x h x w, C = the variant's latent channels)
  pipeline  the tensor a diffusers pipeline carries through its denoising loop (and hands to
            ``callback_on_step_end``): the taesd latent, possibly packed into a sequence

raw <-> taesd, by the family's normalisation:
  scale_shift  taesd = (raw - shift) * scale                (SD 1.x/2.x, SDXL, SD3, FLUX.1, Sana)
  batchnorm    taesd = unpatchify((patchify(raw) - bn_mean) / bn_std)            (FLUX.2)
               i.e. TAESD takes the BatchNorm-*normalised* latent, unpatchified from 128 channels
               at h/2 to 32 at h; the pipeline applies the BatchNorm inverse only for the big VAE.
  mean_std     taesd = (raw - latents_mean) / latents_std, per channel          (Qwen Image 2.1)

taesd <-> pipeline, by the family's packing:
  spatial   the same tensor
  flux      2x2 patches packed into a sequence: N x (h/2 * w/2) x 4C            (FLUX.1)
  flux2     2x2 patchified into channels (4C at h/2), then flattened to N x (h/2 * w/2) x 4C;
            the pipeline scatters tokens back by their position ids              (FLUX.2)
  sequence  a plain spatial flatten N x (h * w) x C; 5-D N x C x 1 x h x w when unpacked (Qwen 2.1)

Constants come from the pipeline's own VAE config when a pipeline (or VAE) is given, else from the
variant registry. Per-channel statistics (FLUX.2's BatchNorm, Qwen 2.1's mean/std) exist only in a
VAE, so converting raw latents of those families needs the pipeline or its VAE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from taesd.errors import TaesdError
from taesd.registry import VARIANTS, Variant, get_variant

PACKING_TEXT = {"spatial": "none (N x C x h x w)",
                "flux": "2x2 patches in a sequence, N x (h/2 * w/2) x 4C",
                "flux2": "2x2 patchified to 4C, sequence N x (h/2 * w/2) x 4C, placed by position ids",
                "sequence": "flat sequence N x (h * w) x C; N x C x 1 x h x w at the VAE"}


@dataclass(frozen=True)
class LatentContract:
    variant: str                       # the TAESD variant that speaks this family's latents
    family: str
    normalization: str                 # "scale_shift" | "batchnorm" | "mean_std"
    packing: str                       # "spatial" | "flux" | "flux2" | "sequence"
    pipelines: tuple[str, ...]         # diffusers pipeline class-name prefixes of the family
    scale: float = 1.0                 # scale_shift: taesd = (raw - shift) * scale
    shift: float = 0.0
    mean: torch.Tensor | None = None  # batchnorm / mean_std: per-channel statistics
    std: torch.Tensor | None = None
    source: str = "registry"           # where the constants came from: "registry" or a VAE class

    @property
    def latent_channels(self) -> int:
        return get_variant(self.variant).latent_channels

    def normalization_text(self) -> str:
        if self.normalization == "scale_shift":
            return f"(raw - {self.shift:g}) * {self.scale:g}"
        if self.normalization == "batchnorm":
            return "BatchNorm-normalised 128ch at h/16, unpatchified to 32ch at h/8 (no BN inverse)"
        return "(raw - latents_mean) / latents_std, per channel"

    def describe(self) -> str:
        return f"{self.family}: taesd = {self.normalization_text()}; packing: {PACKING_TEXT[self.packing]}"


def _registry_contract(v: Variant) -> LatentContract:
    return LatentContract(v.name, v.family, v.normalization, v.packing, v.pipelines, v.vae_scale, v.vae_shift)


# Built from the registry (its normalization/packing/pipelines fields): nothing here is per-variant.
CONTRACTS: dict[str, LatentContract] = {v.name: _registry_contract(v) for v in VARIANTS.values()}


# ---------------------------------------------------------------- finding a pipeline's contract

def variant_for(pipe) -> str:
    """The TAESD variant for a diffusers pipeline: from its class name, else from its VAE."""
    name = type(pipe).__name__
    # Longest prefix wins: "StableDiffusionXL..." before "StableDiffusion...", "Flux2..." before "Flux...".
    matches = [(len(p), c.variant) for c in CONTRACTS.values() for p in c.pipelines if name.startswith(p)]
    if matches:
        return max(matches)[1]
    vae = getattr(pipe, "vae", pipe)
    named = getattr(getattr(vae, "config", None), "taesd_variant", None)
    if named in VARIANTS:  # a TaesdVAE says which variant it is
        return named
    by_class = [v.name for v in VARIANTS.values() if type(vae).__name__ in v.vae_classes]
    if by_class:
        return by_class[0]
    cfg = getattr(vae, "config", None)
    if cfg is not None and type(vae).__name__ == "AutoencoderKL":
        key = (int(cfg.latent_channels), round(float(cfg.scaling_factor), 5),
               round(float(getattr(cfg, "shift_factor", None) or 0.0), 4))
        for c in CONTRACTS.values():
            if (c.latent_channels, round(c.scale, 5), round(c.shift, 4)) == key:
                return c.variant
    raise TaesdError(f"cannot tell which TAESD variant fits {name}; pass variant= "
                     f"({', '.join(CONTRACTS)})")


def contract_for(source, variant: str | None = None) -> LatentContract:
    """The contract for a variant name, a diffusers pipeline, or a pipeline's VAE.

    With a pipeline or VAE, the constants are read from the VAE's config (scaling/shift, FLUX.2's
    BatchNorm running statistics, Qwen 2.1's latents_mean/std); a variant name gives the registry's.
    """
    if isinstance(source, LatentContract):
        return source
    if isinstance(source, str):
        key = get_variant(source).name
        return CONTRACTS[key]
    name = variant or variant_for(source)
    base = CONTRACTS[get_variant(name).name]
    vae = getattr(source, "vae", source)
    if vae is None:  # a pipeline loaded without its VAE (vae=None): the registry's constants
        return base
    return _from_vae(base, vae)


def _from_vae(base: LatentContract, vae) -> LatentContract:
    cfg = getattr(vae, "config", None)
    if cfg is None:
        raise TaesdError(f"{type(vae).__name__} has no config to read latent constants from; "
                         f"pass a diffusers pipeline, its VAE, or a variant name")
    src = type(vae).__name__
    if base.normalization == "scale_shift":
        return replace(base, scale=float(cfg.scaling_factor),
                       shift=float(getattr(cfg, "shift_factor", None) or 0.0), source=src)
    if base.normalization == "batchnorm":
        bn = getattr(vae, "bn", None)
        if bn is None:
            raise TaesdError(f"{src} has no BatchNorm 'bn'; a FLUX.2 contract needs the FLUX.2 VAE")
        std = torch.sqrt(bn.running_var.detach().float() + float(cfg.batch_norm_eps))
        return replace(base, mean=bn.running_mean.detach().float().clone(), std=std, source=src)
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float32)
    std = torch.tensor(cfg.latents_std, dtype=torch.float32)
    return replace(base, mean=mean, std=std, source=src)


# ---------------------------------------------------------------- FLUX.2 patchify (2x2 into channels)

def patchify(z: torch.Tensor) -> torch.Tensor:
    """N x C x h x w -> N x 4C x h/2 x w/2, channel-major (channel c, then the 2x2 offset)."""
    n, c, h, w = z.shape
    return z.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, c * 4, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """N x 4C x h x w -> N x C x 2h x 2w (inverse of ``patchify``)."""
    n, c4, h, w = z.shape
    return z.reshape(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c4 // 4, h * 2, w * 2)


# ---------------------------------------------------------------- raw <-> taesd

def _stats(contract: LatentContract, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if contract.mean is None or contract.std is None:
        what = "BatchNorm running statistics" if contract.normalization == "batchnorm" else "latents_mean/std"
        raise TaesdError(f"{contract.family} raw latents need the VAE's {what}; "
                         f"pass the pipeline or its VAE (contract_for(pipe)), not the variant name")
    shape = (1, -1, 1, 1)
    return (contract.mean.to(like.device, like.dtype).view(shape),
            contract.std.to(like.device, like.dtype).view(shape))


def _frames_to_4d(raw: torch.Tensor) -> torch.Tensor:
    """Video VAEs (Qwen 2.1) use N x C x 1 x h x w; one frame is an image latent."""
    if raw.ndim == 5:
        if raw.shape[2] != 1:
            raise TaesdError(f"latents with {raw.shape[2]} frames are video; TAESD decodes one frame")
        return raw[:, :, 0]
    return raw


def raw_to_taesd(raw: torch.Tensor, contract) -> torch.Tensor:
    """The family's raw VAE latents -> TAESD's latents."""
    c = contract_for(contract)
    raw = _frames_to_4d(raw)
    if c.normalization == "scale_shift":
        return (raw - c.shift) * c.scale
    mean, std = _stats(c, raw)
    if c.normalization == "batchnorm":
        return unpatchify((patchify(raw) - mean) / std)
    return (raw - mean) / std


def taesd_to_raw(z: torch.Tensor, contract) -> torch.Tensor:
    """TAESD's latents -> the family's raw VAE latents (what the big VAE decoder takes)."""
    c = contract_for(contract)
    if c.normalization == "scale_shift":
        return z / c.scale + c.shift
    mean, std = _stats(c, z)
    if c.normalization == "batchnorm":
        return unpatchify(patchify(z) * std + mean)
    return (z * std + mean)[:, :, None]  # the Qwen 2.1 VAE wants a frame axis


# ---------------------------------------------------------------- pipeline <-> taesd (packing)

def _grid(tokens: int, height: int | None, width: int | None, per_token: int, ids) -> tuple[int, int]:
    """Rows x cols of a packed sequence: from position ids, the image size, or a square."""
    if ids is not None:
        ids = ids[0] if ids.ndim == 3 else ids
        ids = ids[:tokens]
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if height is not None and width is not None:
        rows, cols = int(height) // per_token, int(width) // per_token
        if rows * cols == tokens:
            return rows, cols
        raise TaesdError(f"a {height}x{width} image has {rows * cols} latent tokens, the latents hold "
                         f"{tokens}; pass the height and width the pipeline was called with")
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise TaesdError(f"{tokens} packed latent tokens are not a square; pass height= and width= "
                         f"(the image size the pipeline was called with)")
    return side, side


def pipeline_to_taesd(latents: torch.Tensor, contract, height: int | None = None,
                      width: int | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
    """A pipeline's latents (as in ``callback_on_step_end``) -> TAESD's N x C x h x w latents.

    Packed sequences need their grid: ``ids`` (the transformer's ``img_ids``), or the image
    ``height``/``width`` the pipeline was called with; without either a square grid is assumed.
    """
    c = contract_for(contract)
    if latents.ndim == 5:
        return _frames_to_4d(latents)
    if latents.ndim == 4:
        return unpatchify(latents) if c.packing == "flux2" and latents.shape[1] == 4 * c.latent_channels \
            else latents
    if latents.ndim != 3:
        raise TaesdError(f"pipeline latents must be N x C x h x w or a packed N x L x C sequence, "
                         f"got shape {tuple(latents.shape)}")
    n, tokens, ch = latents.shape
    if c.packing == "flux":
        rows, cols = _grid(tokens, height, width, 16, ids)
        x = latents.reshape(n, rows, cols, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(n, ch // 4, rows * 2, cols * 2)
    if c.packing == "flux2":
        rows, cols = _grid(tokens, height, width, 16, ids)
        if ids is not None:  # tokens may come in any order: scatter them by their position ids
            pos = ids if ids.ndim == 3 else ids[None]
            pos = (pos if pos.shape[0] == n else pos[:1].expand(n, -1, -1))[:, :tokens].to(latents.device)
            flat = (pos[..., 1].long() * cols + pos[..., 2].long())
            grid = latents.new_zeros(n, rows * cols, ch)
            grid.scatter_(1, flat[..., None].expand(-1, -1, ch), latents)
            latents = grid
        return unpatchify(latents.transpose(1, 2).reshape(n, ch, rows, cols))
    if c.packing == "sequence":
        rows, cols = _grid(tokens, height, width, get_variant(c.variant).downscale, ids)
        return latents.transpose(1, 2).reshape(n, ch, rows, cols)
    raise TaesdError(f"{c.family} latents are not packed; got a sequence of shape {tuple(latents.shape)}")


def taesd_to_pipeline(z: torch.Tensor, contract) -> torch.Tensor:
    """TAESD's N x C x h x w latents -> the pipeline's layout (inverse of ``pipeline_to_taesd``)."""
    c = contract_for(contract)
    n, ch, h, w = z.shape
    if c.packing == "spatial":
        return z
    if c.packing == "flux":
        x = z.reshape(n, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // 2) * (w // 2), ch * 4)
    if c.packing == "flux2":
        return patchify(z).reshape(n, ch * 4, (h // 2) * (w // 2)).transpose(1, 2)
    return z.reshape(n, ch, h * w).transpose(1, 2)


def pipeline_to_raw(latents: torch.Tensor, contract, height: int | None = None,
                    width: int | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
    """A pipeline's latents -> what its big VAE decoder takes (the pipeline's own decode path)."""
    return taesd_to_raw(pipeline_to_taesd(latents, contract, height, width, ids), contract)


def contract_table() -> str:
    """The declared contracts as a markdown table (registry constants)."""
    rows = ["| family | variant | channels | raw -> TAESD | packing in the pipeline |",
            "| --- | --- | --- | --- | --- |"]
    for c in CONTRACTS.values():
        rows.append(f"| {c.family} | {c.variant} | {c.latent_channels} | {c.normalization_text()} "
                    f"| {PACKING_TEXT[c.packing]} |")
    return "\n".join(rows)
