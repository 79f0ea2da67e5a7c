"""The fast CPU executor for TAEHV: the image executor's kernels (``taesd.runtime.executors.cpu``) applied to
the video blocks. Same modules, same state_dict, same temporal engine; only forwards change:

- every conv runs channels_last with its weight packed once for oneDNN (``FastConv2d``), Winograd
  F(4x4,3x3) in the decoder / F(2x2,3x3) in the encoder where it applies;
- memory blocks fuse conv+ReLU and the last conv + skip add + ReLU into single kernels;
- decoder stages ``Upsample -> TGrow -> conv3x3`` run as ``TGrow`` on the small map (a 1x1 conv
  commutes with a nearest upsample: 4x fewer multiply-adds, bit for bit the same) and one
  upsample+conv kernel (4 instead of 9 multiply-adds per output, or Winograd reading the small map);
- ``_super`` decoders: the residual add fused into the block's last 1x1 conv, TGrow frames made
  channels_last directly, and the last ``TGrow -> conv3x3`` folded into one conv on the ungrown frames;
- a conv followed by a ReLU runs as one kernel; memory blocks take their input and past frames
  already joined along channels (``joins_past``: one copy instead of making the past, then the cat).
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
    _conv_args,
    _weight_key,
    conv_add_relu,
    conv_relu,
    cpu_compute_dtype,
    fused_available,
    tune_allocator,
    upsample_conv,
    winograd_tile_of,
)
from taesd.video.model import TAEHV

CL = torch.channels_last


def _joined(x: torch.Tensor, past: torch.Tensor | None, joined: torch.Tensor | None) -> torch.Tensor:
    """cat(x, past) along channels, channels_last; ``joined``: made so already (``taesd.video.temporal``
    builds it in one pass from the frames, ``joins_past``)."""
    return torch.cat([x, past], 1).contiguous(memory_format=CL) if joined is None else joined


def _past(x: torch.Tensor, past: torch.Tensor | None, joined: torch.Tensor | None) -> torch.Tensor:
    return past if joined is None else joined[:, x.shape[1]:]


class FastMemBlock(MemBlock):
    joins_past = True

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None, joined: torch.Tensor | None = None):
        if not fused_available(x, self):
            return super().forward(x, _past(x, past, joined))
        h = _joined(x, past, joined)
        h = conv_relu(self.conv[2], conv_relu(self.conv[0], h))
        return conv_add_relu(self.conv[4], h, self.skip(x).contiguous(memory_format=CL))


class FastWideMemBlock(WideMemBlock):
    joins_past = True

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None, joined: torch.Tensor | None = None):
        if not fused_available(x, self):
            return super().forward(x, _past(x, past, joined))
        h = _joined(x, past, joined)
        h = conv_relu(self.conv[4], conv_relu(self.conv[2], conv_relu(self.conv[0], h)))
        return conv_add_relu(self.conv[6], h, self.skip(x).contiguous(memory_format=CL))


class FastSuperMemBlock(SuperMemBlock):
    joins_past = True

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None, joined: torch.Tensor | None = None):
        if not fused_available(x, self):
            return super().forward(x, _past(x, past, joined))
        h = conv_relu(self.conv[1], self.conv[0](_joined(x, past, joined)))
        return conv_add(self.conv[3], h, x.contiguous(memory_format=CL))


def conv_add(conv: FastConv2d, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """conv(x) + other in one oneDNN kernel (the ``_super`` block's residual; no activation after)."""
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, other, conv.packed_weight(x), conv.bias_as(x), *_conv_args(conv), "add", None, None, [], None)


class FastTGrow(TGrow):
    """TGrow whose frames come out channels_last: the 1x1 conv's channel groups are copied frame by
    frame into a channels_last batch (a reshape of the channels_last conv output would transpose
    the whole map into NCHW, and the next conv would transpose it back)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 or not fused_available(x, self):
            return super().forward(x)
        y = self.conv(x)
        n, sc, h, w = y.shape
        out = torch.empty(n * self.stride, sc // self.stride, h, w, dtype=y.dtype, memory_format=CL)
        out.unflatten(0, (n, self.stride)).copy_(y.unflatten(1, (self.stride, -1)))
        return out


class FoldedTGrow(TGrow):
    """A TGrow folded into the conv after it (``GrownConv2d``): passes its input on unchanged; its
    weight stays here (same state_dict) and the conv reads it."""

    time_stride = 1      # the frames grow in the conv (taesd.video.temporal.time_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class GrownConv2d(FastConv2d):
    """conv3x3(TGrow(x)) as one conv on the ungrown frames: TGrow is a 1x1 conv without bias (zero
    padding stays zero), so frame j's conv is the 3x3 weight times TGrow's j-th channel block, and
    all ``stride`` of them run as one conv with ``stride`` x the output channels (a tiny output: the
    ``_super`` decoders' last conv makes 3 * patch² channels), then split into frames. The grown map
    (2x the frames at full resolution) and its 1x1 conv are never made."""

    @property
    def time_stride(self) -> int:
        return self.__dict__["_grow"].stride

    def _folded(self) -> FastConv2d:
        grow = self.__dict__["_grow"]
        key = (*_weight_key(self.weight), *_weight_key(grow.conv.weight))
        if self.__dict__.get("_fold_key") != key:
            with torch.no_grad():
                s, c = grow.stride, self.in_channels
                g = grow.conv.weight.detach()[:, :, 0, 0].reshape(s, c, -1)          # frame j: c x c_in
                w = torch.einsum("ocyx,jci->joiyx", self.weight.detach(), g).flatten(0, 1)
                conv = nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1, bias=self.bias is not None)
                conv.weight.copy_(w)
                if self.bias is not None:
                    conv.bias.copy_(self.bias.detach().repeat(s))
            conv.__class__ = FastConv2d
            self.__dict__["_fold"] = conv.to(device=w.device, memory_format=CL).requires_grad_(False)
            self.__dict__["_fold_key"] = key
        return self.__dict__["_fold"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grow = self.__dict__["_grow"]
        if not fused_available(x, self):
            return super().forward(TGrow.forward(grow, x))
        y = self._folded()(x)                                   # N x (stride * C_out) x H x W
        return y.unflatten(1, (grow.stride, -1)).flatten(0, 1)  # frames in time order


class ConvReLU2d(FastConv2d):
    """relu(conv(x)) in one kernel: stands where a conv followed by an ``nn.ReLU`` stood, the ReLU
    replaced by ``nn.Identity`` (one pass less over the conv's output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_available(x, self):
            return conv_relu(self, x.contiguous(memory_format=CL))
        return F.relu(super().forward(x))


class UpsampledConv2d(FastConv2d):
    """conv3x3(nearest_upsample_2x(x)): stands where the conv after an ``Upsample`` stood, the
    ``Upsample`` itself replaced by ``nn.Identity`` (and the ``TGrow`` between them left to run on
    the small map)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_available(x, self):
            return upsample_conv(self, x)
        return super().forward(F.interpolate(x, scale_factor=2, mode="nearest"))


_BLOCKS = {MemBlock: FastMemBlock, WideMemBlock: FastWideMemBlock, SuperMemBlock: FastSuperMemBlock,
           TGrow: FastTGrow}


def _fuse_upsamples(seq: nn.Sequential) -> None:
    for i in range(len(seq) - 2):
        up, grow, conv = seq[i], seq[i + 1], seq[i + 2]
        if (type(up) is nn.Upsample and up.mode == "nearest" and up.scale_factor in (2, 2.0)
                and isinstance(grow, TGrow) and type(conv) is FastConv2d and conv.kernel_size == (3, 3)
                and conv.stride == (1, 1) and conv.groups == 1):
            seq[i] = nn.Identity()
            conv.__class__ = UpsampledConv2d
            conv.upsample_factor = 2


def _fuse_relus(seq: nn.Sequential) -> None:
    for i in range(len(seq) - 1):
        if type(seq[i]) is FastConv2d and type(seq[i + 1]) is nn.ReLU:
            seq[i].__class__ = ConvReLU2d
            seq[i + 1] = nn.Identity()


def _fold_last_grow(seq: nn.Sequential) -> None:
    """The ``_super`` decoders end ``PixelShuffle -> TGrow -> conv3x3``: fold the TGrow into the conv."""
    if (len(seq) >= 3 and type(seq[-3]) is nn.PixelShuffle and type(seq[-2]) is FastTGrow
            and seq[-2].stride > 1 and type(seq[-1]) is FastConv2d and seq[-1].kernel_size == (3, 3)
            and seq[-1].groups == 1 and seq[-1].stride == (1, 1)):
        seq[-2].__class__ = FoldedTGrow
        seq[-1].__class__ = GrownConv2d
        seq[-1].__dict__["_grow"] = seq[-2]


def make_fast(model: TAEHV, allocator: bool = True, use_winograd: bool = True,
              bf16: bool | None = None) -> TAEHV:
    """Transform ``model`` in place for fast CPU inference and return it (module docstring).
    ``bf16``: whether an fp32 model computes in bf16 (weights stay fp32, each conv packs a bf16 copy
    once; inputs and outputs keep their dtype); None: the image executor's rule
    (``cpu_compute_dtype``: ``$TAESD_CPU_BF16``, else bf16 on AMX and AVX-512-BF16 CPUs)."""
    if allocator:
        tune_allocator()
    ref = next(model.parameters())
    model.compute_dtype = cpu_compute_dtype(ref.dtype, ref.device, bf16)
    use_winograd = use_winograd and winograd.available()
    for part in model.parts:
        seq = getattr(model, part)
        seq.to(memory_format=CL)
        for sub in seq.modules():
            if type(sub) in _BLOCKS:
                sub.__class__ = _BLOCKS[type(sub)]
            elif type(sub) is nn.Conv2d:
                sub.__class__ = FastConv2d
                sub.winograd = winograd_tile_of(WINOGRAD_TILES.get(part, 0) if use_winograd else 0,
                                                model.compute_dtype == torch.bfloat16, sub)
        _fuse_upsamples(seq)
        _fold_last_grow(seq)
        _fuse_relus(seq)
    return model
