"""The published architectures as literal flat ``nn.Sequential`` lists, one per ``Arch``.

Indices are the key prefixes of the published ``.pth`` files, so a published state dict loads with
``load_state_dict`` unchanged. ``base_encoder``/``base_decoder`` are the parametric form of the base
architecture (width, depth) that the training students share.
"""
from __future__ import annotations

import torch.nn as nn

from taesd.errors import TaesdError
from taesd.nn.layers import Block, Clamp, conv
from taesd.registry import Arch, Variant, get_variant


def _down(n_in: int, n_out: int) -> nn.Conv2d:
    return conv(n_in, n_out, stride=2, bias=False)


def _up(n_in: int, n_out: int) -> list[nn.Module]:
    return [nn.Upsample(scale_factor=2), conv(n_in, n_out, bias=False)]


def base_encoder(latent_channels: int, width: int = 64, depth: int = 3, pool: bool = False) -> nn.Sequential:
    """The base 8x encoder: one block at full resolution, then three [2x down, ``depth`` blocks]
    stages (published: width 64, depth 3; FLUX.2 adds the pool branch in the last stage)."""
    w = width
    layers: list[nn.Module] = [conv(3, w), Block(w, w)]
    for stage in range(3):
        layers += [_down(w, w), *[Block(w, w, pool and stage == 2) for _ in range(depth)]]
    return nn.Sequential(*layers, conv(w, latent_channels))


def base_decoder(latent_channels: int, width: int = 64, depth: int = 3, pool: bool = False) -> nn.Sequential:
    """The base 8x decoder: ``depth`` blocks (pool branch on FLUX.2), then three [2x up, blocks]
    stages; the last, full-resolution stage has one block, as published."""
    w = width
    layers: list[nn.Module] = [Clamp(), conv(latent_channels, w), nn.ReLU(),
                               *[Block(w, w, pool) for _ in range(depth)]]
    for stage in range(3):
        layers += [*_up(w, w), *[Block(w, w) for _ in range(depth if stage < 2 else 1)]]
    return nn.Sequential(*layers, conv(w, 3))


def build_encoder(variant: str | Variant) -> nn.Sequential:
    v = get_variant(variant)
    C = v.latent_channels
    if v.arch in (Arch.BASE, Arch.BASE_POOL):
        return base_encoder(C, pool=v.arch == Arch.BASE_POOL)
    if v.arch == Arch.F32:
        stages = []
        for _ in range(3):
            stages += [_down(64, 64), Block(64, 64), Block(64, 64), Block(64, 64)]
        return nn.Sequential(
            conv(3, 32, stride=2), nn.ReLU(), conv(32, 64, stride=2), nn.ReLU(), Block(64, 64),
            *stages, conv(64, C))
    if v.arch == Arch.F16:
        return nn.Sequential(
            nn.PixelUnshuffle(2), conv(16, 64), nn.ReLU(), Block(64, 64),
            _down(64, 64), Block(64, 64), Block(64, 64), Block(64, 64),
            _down(64, 128), Block(128, 128), Block(128, 128), Block(128, 128),
            _down(128, 256), Block(256, 256), Block(256, 256), Block(256, 256),
            conv(256, C))
    raise TaesdError(f"unknown architecture {v.arch!r}")


def build_decoder(variant: str | Variant) -> nn.Sequential:
    v = get_variant(variant)
    C = v.latent_channels
    if v.arch in (Arch.BASE, Arch.BASE_POOL):
        return base_decoder(C, pool=v.arch == Arch.BASE_POOL)
    if v.arch in (Arch.F32, Arch.F16):
        layers: list[nn.Module] = [
            Clamp(), conv(C, 256), nn.ReLU(),
            Block(256, 256), Block(256, 256), Block(256, 256), *_up(256, 128),
            Block(128, 128), Block(128, 128), Block(128, 128), *_up(128, 64),
            Block(64, 64), Block(64, 64), Block(64, 64), *_up(64, 64)]
        if v.arch == Arch.F32:
            layers += [Block(64, 64), Block(64, 64), Block(64, 64), *_up(64, 64),
                       Block(64, 64), Block(64, 64), Block(64, 64), *_up(64, 64),
                       Block(64, 64), conv(64, 3)]
        else:
            layers += [Block(64, 64), conv(64, 16), nn.PixelShuffle(2)]
        return nn.Sequential(*layers)
    raise TaesdError(f"unknown architecture {v.arch!r}")


def build_part(variant: str | Variant, part: str) -> nn.Sequential:
    if part == "encoder":
        return build_encoder(variant)
    if part == "decoder":
        return build_decoder(variant)
    raise TaesdError(f"unknown part {part!r}; use 'encoder' or 'decoder'")
