"""The published TAEHV architectures (madebyollin/taehv) as literal flat ``nn.Sequential`` lists.

Indices are the key prefixes of the published files (``encoder.N.*``, ``decoder.N.*``), so a
published state dict loads unchanged. Every layer maps frames to frames (a ``N*T x C x H x W``
batch) except the temporal ones, which ``taesd.video`` runs with their state:

- ``MemBlock``-like blocks see the current frame and the previous frame's *input* ("past",
  zeros before the first frame);
- ``TPool`` merges ``stride`` consecutive frames into one (channels stacked, then a 1x1 conv);
- ``TGrow`` turns one frame into ``stride`` frames (a 1x1 conv to ``stride * C`` channels).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from taesd.errors import TaesdError
from taesd.nn.layers import Clamp, conv
from taesd.registry import VideoVariant, get_video_variant


def _channels_last(f, x: torch.Tensor) -> torch.Tensor:
    """``f(x)`` (convolutions with 1x1 ones among them) run on a channels_last ``x``, the result in
    ``x``'s layout. PyTorch runs a 1x1 conv on an NCHW map as one GEMM whose rounding depends on the
    map's size; channels_last gives every pixel the same sum at any size, so a spatial tile computes
    bit for bit what the whole frame does (taesd.video.tiling)."""
    if x.device.type != "cpu" or x.is_contiguous(memory_format=torch.channels_last):
        return f(x)
    return f(x.contiguous(memory_format=torch.channels_last)).contiguous()


class MemBlock(nn.Module):
    """relu(conv-relu-conv-relu-conv(cat(x, past)) + skip(x)): the base temporal block."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in * 2, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(),
                                  conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class SuperMemBlock(nn.Module):
    """The ``_super`` decoders' block: 7x7 depthwise conv, then an inverted 1x1 bottleneck; residual,
    no activation after the sum."""

    def __init__(self, n_f: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(n_f * 2, n_f * 2, 7, padding=3, groups=n_f * 2, bias=False),
            nn.Conv2d(n_f * 2, n_f * 4, 1), nn.ReLU(), nn.Conv2d(n_f * 4, n_f, 1, bias=False))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return _channels_last(self.conv, torch.cat([x, past], 1)) + x


class WideMemBlock(nn.Module):
    """The ``_wide`` decoder's block: 1x1, grouped 3x3 (groups = width / 64), 1x1, grouped 3x3."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        groups = max(1, n_out // 64)
        self.conv = nn.Sequential(
            nn.Conv2d(n_in * 2, n_out, 1), nn.ReLU(), conv(n_out, n_out, groups=groups), nn.ReLU(),
            nn.Conv2d(n_out, n_out, 1), nn.ReLU(), conv(n_out, n_out, groups=groups))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(_channels_last(self.conv, torch.cat([x, past], 1)) + self.skip(x))


MEMORY_BLOCKS = (MemBlock, SuperMemBlock, WideMemBlock)


class TPool(nn.Module):
    """``stride`` consecutive frames -> one: frames stacked along channels, then a 1x1 conv."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (N*T) x C x H x W, T a multiple of stride
        return _channels_last(self.conv, x.unflatten(0, (-1, self.stride)).flatten(1, 2))


class TGrow(nn.Module):
    """One frame -> ``stride`` frames: a 1x1 conv to ``stride * C`` channels, split in time order."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # unflatten/flatten (not reshape with sizes): an ONNX trace keeps the sizes dynamic
        return _channels_last(self.conv, x).unflatten(1, (self.stride, -1)).flatten(0, 1)


def _s(on: bool) -> int:
    return 2 if on else 1


def build_video_encoder(variant: str | VideoVariant) -> nn.Sequential:
    """0 conv, 1 ReLU, then three [TPool, stride-2 conv, 3 MemBlocks] stages, 17 conv to latents."""
    v = get_video_variant(variant)
    t = v.encoder_time_downscale
    return nn.Sequential(
        conv(v.image_channels * v.patch_size ** 2, 64), nn.ReLU(),
        TPool(64, _s(t[0])), conv(64, 64, stride=2, bias=False), MemBlock(64, 64), MemBlock(64, 64), MemBlock(64, 64),  # noqa: E501
        TPool(64, _s(t[1])), conv(64, 64, stride=2, bias=False), MemBlock(64, 64), MemBlock(64, 64), MemBlock(64, 64),  # noqa: E501
        TPool(64, _s(t[2])), conv(64, 64, stride=2, bias=False), MemBlock(64, 64), MemBlock(64, 64), MemBlock(64, 64),  # noqa: E501
        conv(64, v.latent_channels))


def build_video_decoder(variant: str | VideoVariant, time_upscale: tuple[bool, bool, bool] | None = None,
                        space_upscale: tuple[bool, bool, bool] = (True, True, True)) -> nn.Sequential:
    """The decoder of ``variant``. ``time_upscale``/``space_upscale`` switch stages off for cheaper
    previews (the weights still load: a TGrow keeps its last-timestep channels)."""
    v = get_video_variant(variant)
    t = v.decoder_time_upscale if time_upscale is None else tuple(time_upscale)
    s = space_upscale
    C, out = v.latent_channels, v.image_channels * v.patch_size ** 2
    if v.decoder_block == "super":
        n = [512, 256, 128, 64]
        return nn.Sequential(
            nn.Conv2d(C, n[0], 1, bias=False),
            SuperMemBlock(n[0]), SuperMemBlock(n[0]), SuperMemBlock(n[0]), conv(n[0], n[1] * _s(s[0]) ** 2), nn.ReLU(), nn.PixelShuffle(_s(s[0])), TGrow(n[1], _s(t[0])),  # noqa: E501
            SuperMemBlock(n[1]), SuperMemBlock(n[1]), SuperMemBlock(n[1]), conv(n[1], n[2] * _s(s[1]) ** 2), nn.ReLU(), nn.PixelShuffle(_s(s[1])), TGrow(n[2], _s(t[1])),  # noqa: E501
            SuperMemBlock(n[2]), SuperMemBlock(n[2]), SuperMemBlock(n[2]), conv(n[2], n[3] * _s(s[2]) ** 2), nn.ReLU(), nn.PixelShuffle(_s(s[2])), TGrow(n[3], _s(t[2])),  # noqa: E501
            conv(n[3], out))
    wide = v.decoder_block == "wide"
    n, B = ([1024, 512, 256, 64], WideMemBlock) if wide else ([256, 128, 64, 64], MemBlock)
    return nn.Sequential(
        Clamp(), conv(C, n[0]), nn.ReLU(),
        B(n[0], n[0]), B(n[0], n[0]), B(n[0], n[0]), nn.Upsample(scale_factor=_s(s[0])), TGrow(n[0], _s(t[0])), conv(n[0], n[1], bias=False),  # noqa: E501
        B(n[1], n[1]), B(n[1], n[1]), B(n[1], n[1]), nn.Upsample(scale_factor=_s(s[1])), TGrow(n[1], _s(t[1])), conv(n[1], n[2], bias=False),  # noqa: E501
        B(n[2], n[2]), B(n[2], n[2]), B(n[2], n[2]), nn.Upsample(scale_factor=_s(s[2])), TGrow(n[2], _s(t[2])), conv(n[2], n[3], bias=False),  # noqa: E501
        nn.ReLU(), conv(n[3], out))


def build_video_part(variant: str | VideoVariant, part: str) -> nn.Sequential:
    if part == "encoder":
        return build_video_encoder(variant)
    if part == "decoder":
        return build_video_decoder(variant)
    raise TaesdError(f"unknown part {part!r}; use 'encoder' or 'decoder'")
