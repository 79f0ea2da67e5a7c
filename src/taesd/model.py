"""The TAESD network, exactly as published, for every architecture in the registry.

Each encoder/decoder is a flat ``nn.Sequential`` whose indices are the key prefixes of the
published ``.pth`` files, so a published state dict loads with ``load_state_dict`` unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import TaesdError
from .variants import Variant, get_variant


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of latents to (-3, 3): the decoder's first step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """relu(conv-relu-conv-relu-conv(x) + skip(x)); with ``pool``, first x += pool(x) (FLUX.2)."""

    def __init__(self, n_in: int, n_out: int, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(),
                                  conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = nn.Sequential(
            nn.Conv2d(n_in, 4 * n_in, 1, bias=False), nn.GroupNorm(4, 4 * n_in), nn.ReLU(),
            nn.Conv2d(4 * n_in, n_in, 1, bias=False)) if pool else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def _down(n_in: int, n_out: int) -> nn.Conv2d:
    return conv(n_in, n_out, stride=2, bias=False)


def _up(n_in: int, n_out: int) -> list[nn.Module]:
    return [nn.Upsample(scale_factor=2), conv(n_in, n_out, bias=False)]


def build_encoder(variant: "str | Variant") -> nn.Sequential:
    v = get_variant(variant)
    C = v.latent_channels
    if v.arch in ("base", "base+pool"):
        pool = v.arch == "base+pool"
        return nn.Sequential(
            conv(3, 64), Block(64, 64),
            _down(64, 64), Block(64, 64), Block(64, 64), Block(64, 64),
            _down(64, 64), Block(64, 64), Block(64, 64), Block(64, 64),
            _down(64, 64), Block(64, 64, pool), Block(64, 64, pool), Block(64, 64, pool),
            conv(64, C))
    if v.arch == "f32":
        stages = []
        for _ in range(3):
            stages += [_down(64, 64), Block(64, 64), Block(64, 64), Block(64, 64)]
        return nn.Sequential(
            conv(3, 32, stride=2), nn.ReLU(), conv(32, 64, stride=2), nn.ReLU(), Block(64, 64),
            *stages, conv(64, C))
    if v.arch == "f16":
        return nn.Sequential(
            nn.PixelUnshuffle(2), conv(16, 64), nn.ReLU(), Block(64, 64),
            _down(64, 64), Block(64, 64), Block(64, 64), Block(64, 64),
            _down(64, 128), Block(128, 128), Block(128, 128), Block(128, 128),
            _down(128, 256), Block(256, 256), Block(256, 256), Block(256, 256),
            conv(256, C))
    raise TaesdError(f"unknown architecture {v.arch!r}")


def build_decoder(variant: "str | Variant") -> nn.Sequential:
    v = get_variant(variant)
    C = v.latent_channels
    if v.arch in ("base", "base+pool"):
        pool = v.arch == "base+pool"
        return nn.Sequential(
            Clamp(), conv(C, 64), nn.ReLU(),
            Block(64, 64, pool), Block(64, 64, pool), Block(64, 64, pool), *_up(64, 64),
            Block(64, 64), Block(64, 64), Block(64, 64), *_up(64, 64),
            Block(64, 64), Block(64, 64), Block(64, 64), *_up(64, 64),
            Block(64, 64), conv(64, 3))
    if v.arch in ("f32", "f16"):
        layers: list[nn.Module] = [
            Clamp(), conv(C, 256), nn.ReLU(),
            Block(256, 256), Block(256, 256), Block(256, 256), *_up(256, 128),
            Block(128, 128), Block(128, 128), Block(128, 128), *_up(128, 64),
            Block(64, 64), Block(64, 64), Block(64, 64), *_up(64, 64)]
        if v.arch == "f32":
            layers += [Block(64, 64), Block(64, 64), Block(64, 64), *_up(64, 64),
                       Block(64, 64), Block(64, 64), Block(64, 64), *_up(64, 64),
                       Block(64, 64), conv(64, 3)]
        else:
            layers += [Block(64, 64), conv(64, 16), nn.PixelShuffle(2)]
        return nn.Sequential(*layers)
    raise TaesdError(f"unknown architecture {v.arch!r}")


def build_part(variant: "str | Variant", part: str) -> nn.Sequential:
    if part == "encoder":
        return build_encoder(variant)
    if part == "decoder":
        return build_decoder(variant)
    raise TaesdError(f"unknown part {part!r}; use 'encoder' or 'decoder'")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class TAESD(nn.Module):
    """A TAESD encoder and/or decoder for one variant.

    ``encode``: images N x (3|4) x H x W in [0, 1] -> latents in TAESD's convention.
    ``decode``: latents -> images clamped to [0, 1].
    Either part may be absent (``parts=("encoder",)``), e.g. when only one weight file exists.
    """

    def __init__(self, variant: "str | Variant", parts=("encoder", "decoder")):
        super().__init__()
        self.variant = get_variant(variant)
        parts = (parts,) if isinstance(parts, str) else tuple(parts)
        self.encoder = build_encoder(self.variant) if "encoder" in parts else None
        self.decoder = build_decoder(self.variant) if "decoder" in parts else None
        # Where the weights came from (filled by taesd.load): path -> sha256, format.
        self.weights_info: dict = {}

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in ("encoder", "decoder") if getattr(self, p) is not None)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _require(self, part: str) -> nn.Sequential:
        module = getattr(self, part)
        if module is None:
            raise TaesdError(f"this {self.variant.name} model has no {part} loaded; "
                             f"load it with parts including {part!r}")
        return module

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """Check an image batch and bring it to the encoder's channel count, dtype and device."""
        if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4):
            raise TaesdError("images must be a tensor N x C x H x W (or C x H x W) with values in [0, 1]")
        if images.ndim == 3:
            images = images[None]
        want, got = self.variant.image_channels, images.shape[1]
        if got == 3 and want == 4:  # RGB into the RGBA variant: alpha 1
            images = torch.cat([images, torch.ones_like(images[:, :1])], 1)
        elif got != want:
            raise TaesdError(f"{self.variant.name} encodes {want}-channel images, got {got} channels")
        d = self.variant.downscale
        if images.shape[-2] % d or images.shape[-1] % d:
            raise TaesdError(f"image size {images.shape[-2]}x{images.shape[-1]} is not a multiple of "
                             f"{d}; pad it first (taesd.images.pad_to_multiple)")
        return images.to(device=self.device, dtype=self.dtype)

    def prepare_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.ndim not in (3, 4):
            raise TaesdError("latents must be a tensor N x C x h x w (or C x h x w)")
        if latents.ndim == 3:
            latents = latents[None]
        want, got = self.variant.latent_channels, latents.shape[1]
        if got != want:
            raise TaesdError(f"{self.variant.name} decodes {want}-channel latents, got {got} channels"
                             f"{_guess_variant_hint(got)}")
        return latents.to(device=self.device, dtype=self.dtype)

    def run_part(self, part: str, x: torch.Tensor) -> torch.Tensor:
        """Run one part on a prepared batch. The single place that executes the network: faster
        executors and other backends replace this; tiling calls it per tile."""
        return self._require(part)(x)

    def encode(self, images: torch.Tensor, tile_size=None, max_memory=None) -> torch.Tensor:
        """``tile_size`` (latent pixels) / ``max_memory`` (bytes or "1GiB"): seam-exact tiling; with
        neither, tiling switches on when the untiled pass would not fit (see taesd.tiling)."""
        from .tiling import run
        self._require("encoder")
        with torch.inference_mode():
            # contiguous: the fast executor works channels_last; callers get the standard layout
            return run(self, "encoder", self.prepare_images(images), tile_size, max_memory).contiguous()

    def decode(self, latents: torch.Tensor, tile_size=None, max_memory=None) -> torch.Tensor:
        """Latents -> images in [0, 1]; tiling options as in ``encode``."""
        from .tiling import run
        self._require("decoder")
        with torch.inference_mode():
            return run(self, "decoder", self.prepare_latents(latents), tile_size, max_memory).contiguous()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Round trip: encode then decode (differentiable, for training)."""
        return self._require("decoder")(self._require("encoder")(images))


def _guess_variant_hint(channels: int) -> str:
    from .variants import VARIANTS
    names = [v.name for v in VARIANTS.values() if v.latent_channels == channels]
    return f" (those fit {'/'.join(names)})" if names else ""


def create(variant: "str | Variant", parts=("encoder", "decoder"), device=None,
           dtype=None, seed: int | None = None) -> TAESD:
    """A freshly initialised TAESD of the given variant (PyTorch's default init)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = TAESD(variant, parts).eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
