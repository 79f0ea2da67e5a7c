"""The fast CPU executor for TAEHV: the image executor's kernels (``taesd.runtime.executors.cpu``) applied to
the video blocks. Same modules, same state_dict, same temporal engine; only forwards change:

- every conv runs channels_last with its weight packed once for oneDNN (``FastConv2d``), Winograd
  F(4x4,3x3) in the decoder / F(2x2,3x3) in the encoder where it applies;
- memory blocks fuse conv+ReLU and the last conv + skip add + ReLU into single kernels;
- decoder stages ``Upsample -> TGrow -> conv3x3`` run as ``TGrow`` on the small map (a 1x1 conv
  commutes with a nearest upsample: 4x fewer multiply-adds, bit for bit the same) and one
  upsample+conv kernel (4 instead of 9 multiply-adds per output, or Winograd reading the small map).
Decoded pixels stay within ~1e-5 of the plain network; ``use_winograd=False`` keeps it within fp32
rounding of the sums of phase weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from taesd.nn.taehv import MemBlock, SuperMemBlock, TGrow, WideMemBlock
from taesd.runtime import winograd
from taesd.runtime.executors.cpu import (
    WINOGRAD_TILES,
    FastConv2d,
    conv_add_relu,
    conv_relu,
    fused_available,
    tune_allocator,
    upsample_conv,
)
from taesd.video.model import TAEHV

CL = torch.channels_last


class FastMemBlock(MemBlock):
    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        if not fused_available(x, self):
            return super().forward(x, past)
        h = torch.cat([x, past], 1).contiguous(memory_format=CL)
        h = conv_relu(self.conv[2], conv_relu(self.conv[0], h))
        return conv_add_relu(self.conv[4], h, self.skip(x).contiguous(memory_format=CL))


class FastWideMemBlock(WideMemBlock):
    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        if not fused_available(x, self):
            return super().forward(x, past)
        h = torch.cat([x, past], 1).contiguous(memory_format=CL)
        h = conv_relu(self.conv[4], conv_relu(self.conv[2], conv_relu(self.conv[0], h)))
        return conv_add_relu(self.conv[6], h, self.skip(x).contiguous(memory_format=CL))


class FastSuperMemBlock(SuperMemBlock):
    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        if not fused_available(x, self):
            return super().forward(x, past)
        h = self.conv[0](torch.cat([x, past], 1).contiguous(memory_format=CL))
        return self.conv[3](conv_relu(self.conv[1], h)) + x


class UpsampledConv2d(FastConv2d):
    """conv3x3(nearest_upsample_2x(x)): stands where the conv after an ``Upsample`` stood, the
    ``Upsample`` itself replaced by ``nn.Identity`` (and the ``TGrow`` between them left to run on
    the small map)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_available(x, self):
            return upsample_conv(self, x)
        return super().forward(F.interpolate(x, scale_factor=2, mode="nearest"))


_BLOCKS = {MemBlock: FastMemBlock, WideMemBlock: FastWideMemBlock, SuperMemBlock: FastSuperMemBlock}


def _fuse_upsamples(seq: nn.Sequential) -> None:
    for i in range(len(seq) - 2):
        up, grow, conv = seq[i], seq[i + 1], seq[i + 2]
        if (type(up) is nn.Upsample and up.mode == "nearest" and up.scale_factor in (2, 2.0)
                and isinstance(grow, TGrow) and type(conv) is FastConv2d and conv.kernel_size == (3, 3)
                and conv.stride == (1, 1) and conv.groups == 1):
            seq[i] = nn.Identity()
            conv.__class__ = UpsampledConv2d
            conv.upsample_factor = 2


def make_fast(model: TAEHV, allocator: bool = True, use_winograd: bool = True) -> TAEHV:
    """Transform ``model`` in place for fast CPU inference and return it (module docstring)."""
    if allocator:
        tune_allocator()
    use_winograd = use_winograd and winograd.available()
    for part in model.parts:
        seq = getattr(model, part)
        seq.to(memory_format=CL)
        for sub in seq.modules():
            if type(sub) in _BLOCKS:
                sub.__class__ = _BLOCKS[type(sub)]
            elif type(sub) is nn.Conv2d:
                sub.__class__ = FastConv2d
                sub.winograd = WINOGRAD_TILES.get(part, 0) if use_winograd else 0
        _fuse_upsamples(seq)
    return model
