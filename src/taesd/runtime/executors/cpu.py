"""The CPU executor ("cpu"; what "fast" means on a CPU): the same network, the same modules and
weights, run close to the hardware.

``CpuExecutor().apply(model)`` (or ``make_fast(model)``) transforms a ``TAESD`` in place;
``taesd.load`` applies it by default on a CPU. What it
does, each measured (docs/performance.md):

- allocator: eager PyTorch on glibc gets a fresh ``mmap`` for every activation over 32 MiB (one
  64-channel 512x512 fp32 map is 64 MiB), page-faulted and zeroed on first touch, then unmapped
  again: ~100k-370k page faults per decode. ``tune_allocator`` raises glibc's mmap and trim
  thresholds (``mallopt``) so freed activations stay in the heap and are reused. It is a process
  setting; ``TAESD_MALLOPT=0`` in the environment switches it off.
- layout: weights in channels_last, so every convolution runs in oneDNN's native NHWC layout
  instead of reordering NCHW data in and out of each layer.
- packed weights: every convolution's weight is reordered once into oneDNN's blocked layout and
  kept (``FastConv2d``); a plain convolution reorders it again on every call.
- upsample+conv: where Winograd applies, its kernel reads the small map upsampled on the fly.
  Elsewhere a nearest 2x upsample and the 3x3 conv after it run as one 2x2 convolution on
  the small input that yields the four output phases (4 instead of 9 multiply-adds per output
  pixel and channel pair; the upsampled map is never made). Sums of weights: fp32 rounding only.
- fusion: inside each residual ``Block`` the conv+bias+ReLU pairs and the last conv + skip add +
  ReLU run as single oneDNN kernels (``mkldnn._convolution_pointwise``): three fewer passes over
  memory per block. In bf16 on AMX CPUs the whole block is one pass of our AMX kernel
  (``taesd.runtime.amx``), its intermediate maps never leaving the cache, and an upsample + conv with
  the block after it (and the last conv, to RGB), or the first conv (from RGB) and a block with the
  stride-2 conv after it, is one chain (``AmxChain``). Blocks keep their class layout
  (``conv``/``skip``/``fuse``/``pool``), so ``state_dict`` keys, Sequential indices and layer slices
  (tiling) are unchanged.
- Winograd: 3x3 stride-1 convolutions on maps of 48x48 px and more run as Winograd F(4x4,3x3)
  (decoder; encoder at full resolution) or F(2x2,3x3) (the encoder's downsampled stages) in our
  own kernel (``taesd.runtime.winograd``): 2.25x / 4x fewer
  multiplies, bias + residual + ReLU fused. Decoded pixels stay within ~1e-5 of the plain network,
  latents as close to a float64 evaluation as plain fp32's (docs/performance.md). In bf16 on CPUs
  with AVX-512-BF16 and no AMX (AMD Zen 4) the same kernel runs bf16 dot products, F(4x4) for every
  conv (``BF16_WINOGRAD_TILE``). ``TAESD_WINOGRAD=0`` or ``CpuExecutor(use_winograd=False)`` keeps
  every convolution direct.
- narrow convs: the decoder's last conv (64 -> 3) runs in our own direct kernel
  (``taesd.runtime.narrow``): oneDNN computes 16 output channels at a time and wastes most of them.
- batches: big maps run image by image, small ones batched (``PER_IMAGE_BYTES``); exact.

Without Winograd everything stays exact in fp32 (the same oneDNN convolutions). Where the
fused kernels do not apply (a GPU, autograd, a dtype this CPU has no fused kernel for) a block runs
its plain forward.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from taesd import settings
from taesd.nn.layers import Block
from taesd.runtime import amx, isa, narrow, winograd
from taesd.runtime.executors.base import Executor, eager_only, swap, unswap, without_caches
from taesd.tiling import memory
from taesd.tiling.memory import M_MMAP_THRESHOLD, M_TOP_PAD, M_TRIM_THRESHOLD
from taesd.tiling.runner import untiled_pixels

MMAP_THRESHOLD = 1 << 30      # blocks below 1 GiB come from the heap, not a fresh mmap
# Keep up to 2 GiB of freed heap instead of returning it at once: a 1024² encode has ~1 GiB of
# 256 MiB activations live; with 1 GiB it was trimmed and faulted in again (~300k faults, +25% time).
TRIM_THRESHOLD = (1 << 31) - 1   # mallopt takes an int: 2 GiB - 1 is its maximum
TOP_PAD = 64 << 20            # grow the heap in 64 MiB steps

_allocator_tuned: bool | None = None


def tune_allocator() -> bool:
    """Make glibc reuse freed activations instead of mmap/munmap-ing each one (once per process).
    Returns whether the setting is active. Off with ``TAESD_MALLOPT=0``; a no-op off glibc."""
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if not settings.mallopt():
        return False
    _allocator_tuned = memory.set_allocator(
        {M_MMAP_THRESHOLD: MMAP_THRESHOLD, M_TRIM_THRESHOLD: TRIM_THRESHOLD, M_TOP_PAD: TOP_PAD})
    return _allocator_tuned


# ---------------------------------------------------------------- fused oneDNN convolutions

_fused_ok: dict[torch.dtype, bool] = {}   # per dtype: does this CPU run the fused kernels?


def _conv_args(conv: nn.Conv2d) -> tuple:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def _weight_key(w: torch.Tensor) -> tuple:
    """Changes when the weight does: new storage, in-place update (version), new dtype."""
    return w.data_ptr(), 0 if w.is_inference() else w._version, w.dtype


PACK_CACHE = ("_packed", "_pack_key", "_up_packed", "_up_bias", "_up_key", "_wino_U", "_wino_key", "_bias_as",
              "_amx_w", "_amx_key", "_amx_col_w", "_amx_col_key", "_amx_nar_w", "_amx_nar_key", "_narrow_w",
              "_narrow_key", "_amx_1x1_w", "_amx_1x1_key")


class FastConv2d(nn.Conv2d):
    """A ``Conv2d`` run by oneDNN with its weight packed once into oneDNN's blocked layout (plain
    convolutions reorder the weight on every call: ~35 reorders per decode). Same state_dict; the
    pack is redone when the weight changes (load_state_dict, .to(dtype))."""

    def packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        key = (*_weight_key(self.weight), x.dtype)   # an fp32 model computing in bf16 packs bf16
        if self.__dict__.get("_pack_key") != key:
            with torch.no_grad():
                self.__dict__["_packed"] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    self.weight.detach().to(x.dtype).contiguous().to_mkldnn(), *_conv_args(self),
                    list(x.shape))
            self.__dict__["_pack_key"] = key
        return self.__dict__["_packed"]

    def packed_upsample_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight of ``upsample_conv``: the four 2x2 phase kernels as 4 x out_channels."""
        w = self.weight
        key = (*_weight_key(w), x.dtype)
        if self.__dict__.get("_up_key") != key:
            with torch.no_grad():
                phases = phase_kernels(w.detach().float()).to(x.dtype)
                self.__dict__["_up_packed"] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    phases.contiguous().to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, list(x.shape))
                self.__dict__["_up_bias"] = None if self.bias is None else self.bias.detach().repeat(4)
            self.__dict__["_up_key"] = key
        return self.__dict__["_up_packed"]

    def bias_as(self, x: torch.Tensor) -> "torch.Tensor | None":
        """The bias in ``x``'s dtype (the fused conv+add kernel wants them equal; the others take an
        fp32 bias with bf16 data)."""
        b = self.bias
        if b is None or b.dtype == x.dtype:
            return b
        cached = self.__dict__.get("_bias_as")
        if cached is None or cached[0] != (*_weight_key(b), x.dtype):
            cached = self.__dict__["_bias_as"] = ((*_weight_key(b), x.dtype), b.detach().to(x.dtype))
        return cached[1]

    def _kept(self, slot: str, key_slot: str, key: tuple, make) -> torch.Tensor:
        """``make()``, kept in ``slot`` until ``key`` (the weight's identity, plus what the layout
        depends on) changes."""
        if self.__dict__.get(key_slot) != key:
            self.__dict__[slot] = make()
            self.__dict__[key_slot] = key
        return self.__dict__[slot]

    def winograd_weight(self, m: int, dtype: torch.dtype) -> torch.Tensor:
        """The weight transformed for Winograd F(m x m, 3x3) for activations of ``dtype`` (an fp32
        weight computing in bf16 gets a bf16 transform), kept until the weight changes."""
        return self._kept("_wino_U", "_wino_key", (*_weight_key(self.weight), m, dtype),
                          lambda: winograd.transform_weight(self.weight, m, dtype))

    def amx_weight(self) -> torch.Tensor:
        """The weight in the AMX kernel's tile layout (bf16), kept until the weight changes."""
        return self._kept("_amx_w", "_amx_key", _weight_key(self.weight),
                          lambda: amx.pack_weight(self.weight))

    def amx_1x1_weight(self) -> torch.Tensor:
        """This 1x1 conv's weight as the AMX kernel's B tiles (``amx.pack_1x1_weight``), kept until it
        changes."""
        return self._kept("_amx_1x1_w", "_amx_1x1_key", _weight_key(self.weight),
                          lambda: amx.pack_1x1_weight(self.weight))

    def narrow_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in our narrow conv kernel's layout (``taesd.runtime.narrow``), kept until the
        weight changes."""
        return self._kept("_narrow_w", "_narrow_key", (*_weight_key(self.weight), dtype),
                          lambda: narrow.pack_weight(self.weight, dtype))

    def uses_amx(self, x: torch.Tensor, upsample: bool = False, shape: "tuple | None" = None) -> bool:
        """This bf16 call can run our AMX kernel (decided as the untiled map would, like Winograd).
        The executor uses it for every 3x3 conv it applies to: upsample + conv pairs, whole residual
        blocks (``amx.block``), stride-2 convs and lone convs with or without a fused ReLU / add + ReLU
        (TAEHV's memory blocks); benchmarks/AMX.md: 1.2-1.4x oneDNN's bf16 conv on a lone conv,
        1.3-1.7x on a block and on upsample + conv."""
        return x.dtype == torch.bfloat16 and amx.supports(self, x, upsample, untiled_pixels.get(), shape) \
            and amx.available()

    def uses_amx_im2col(self, x: torch.Tensor) -> bool:
        """This bf16 call is a first conv (at most 3 input channels) that our AMX kernel runs as an
        im2col stage (``amx.supports_im2col``), decided as the untiled map would."""
        return x.dtype == torch.bfloat16 and amx.supports_im2col(self, x, untiled_pixels.get()) \
            and amx.available()

    def amx_im2col_stage(self) -> "amx.ChainStage":
        """This conv as the im2col first stage of an AMX chain (weight packed once, kept until it changes)."""
        packed = self._kept("_amx_col_w", "_amx_col_key", _weight_key(self.weight),
                            lambda: amx.pack_im2col_weight(self.weight))
        return amx.ChainStage(packed, self.out_channels, self.bias, im2col=True)

    def uses_amx_narrow(self, x: torch.Tensor, shape: "tuple | None" = None) -> bool:
        """This bf16 call is a last conv (to at most 16 channels) that our AMX kernel runs as a narrow
        stage (``amx.supports_narrow``), decided as the untiled map would."""
        return x.dtype == torch.bfloat16 and amx.supports_narrow(self, x, untiled_pixels.get(), shape) \
            and amx.available()

    def amx_narrow_stage(self) -> "amx.ChainStage":
        """This conv as the narrow last stage of an AMX chain (weight packed once, kept until it changes)."""
        packed = self._kept("_amx_nar_w", "_amx_nar_key", _weight_key(self.weight),
                            lambda: amx.pack_narrow_weight(self.weight))
        return amx.ChainStage(packed, self.out_channels, self.bias, narrow=True)

    def amx_conv(self, x: torch.Tensor, relu: bool = False, residual: "torch.Tensor | None" = None,
                 upsample: bool = False) -> torch.Tensor:
        """This conv (+ residual, ReLU; of x nearest-upsampled 2x) on our AMX kernel (``uses_amx``)."""
        return amx.conv3x3(x, self.amx_weight(), self.out_channels, self.bias, residual=residual, relu=relu,
                           upsample=upsample, stride=self.stride[0])

    def winograd_tile(self, x: torch.Tensor, upsample: bool = False) -> int:
        """The Winograd tile size m to run this call with, 0 for oneDNN's direct convolution."""
        m = getattr(self, "winograd", 0)
        # A tile decides as the untiled map would: the same algorithm gives the same rounding.
        pixels = untiled_pixels.get()
        return m if m and winograd.supports(self, x, upsample, pixels) and winograd.available() else 0

    def __getstate__(self):  # copies and pickles carry no packed (oneDNN-only) tensor
        return without_caches(super().__getstate__(), PACK_CACHE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused_available(x, self):
            return super().forward(x)
        if self.uses_amx(x):   # bf16: the encoder's downsampling convs, TAEHV's memory-block convs
            return self.amx_conv(x)
        if self.uses_amx_im2col(x):   # bf16: the encoder's first conv, from RGB
            return amx.chain(x, [self.amx_im2col_stage()])
        if self.uses_amx_narrow(x):    # bf16: the decoder's last conv, to RGB
            return amx.chain(x, [self.amx_narrow_stage()])
        if self.out_channels <= narrow.MAX_OUT and narrow.supports(self, x, untiled_pixels.get()):
            return narrow.conv3x3(x, self.narrow_weight(x.dtype), self.bias)   # the last conv, to RGB
        m = self.winograd_tile(x)
        if m:
            return winograd.conv3x3(x, self.winograd_weight(m, x.dtype), self.bias, m)
        return torch.ops.mkldnn._convolution_pointwise(
            x.contiguous(memory_format=torch.channels_last), self.packed_weight(x), self.bias,
            *_conv_args(self), "none", [], None)


def conv_relu(conv: FastConv2d, x: torch.Tensor) -> torch.Tensor:
    """relu(conv(x)) in one kernel (Winograd where the conv has a tile size, our AMX kernel in bf16
    where it applies, else oneDNN)."""
    if conv.uses_amx(x):
        return conv.amx_conv(x, relu=True)
    m = conv.winograd_tile(x)
    if m:
        return winograd.conv3x3(x, conv.winograd_weight(m, x.dtype), conv.bias, m, relu=True)
    return torch.ops.mkldnn._convolution_pointwise(x, conv.packed_weight(x), conv.bias, *_conv_args(conv),
                                                   "relu", [], None)


def conv_add_relu(conv: FastConv2d, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """relu(conv(x) + other) in one kernel (the residual block's end); ``other`` is only read."""
    if conv.uses_amx(x) and other.shape[1] == conv.out_channels and other.dtype == x.dtype:
        return conv.amx_conv(x, relu=True, residual=other)
    m = conv.winograd_tile(x)
    if m:
        return winograd.conv3x3(x, conv.winograd_weight(m, x.dtype), conv.bias, m, residual=other, relu=True)
    if conv.groups > 1 and x.dtype != torch.float32:
        # PyTorch's fallback for a grouped conv with a binary post-op has no reduced-precision add_relu
        return FastConv2d.forward(conv, x).add_(other).relu_()
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, other, conv.packed_weight(x), conv.bias_as(x), *_conv_args(conv), "add", None, "relu", [], None)


def fused_available(x: torch.Tensor, module: nn.Module | None = None) -> bool:
    """The fused kernels apply: CPU, no autograd through ``x`` or ``module``'s parameters, fp32
    (or bf16/fp16 where this CPU has them)."""
    if x.device.type != "cpu" or not torch.backends.mkldnn.is_available() or eager_only(x, module):
        return False
    return native(x.dtype)


def native(dtype: torch.dtype) -> bool:
    """This CPU runs the fused kernels in ``dtype`` (probed once per dtype)."""
    ok = _fused_ok.get(dtype)
    if ok is None:
        ok = _fused_ok[dtype] = _probe_fused(dtype)
    return ok


def _probe_fused(dtype: torch.dtype) -> bool:
    """Run both fused kernels once on a tiny input; some need CPU features (bf16: AVX-512 or
    AVX-NE-CONVERT)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    with torch.inference_mode(False):  # the first call may come from inside inference_mode
        conv = nn.Conv2d(8, 8, 3, padding=1).to(dtype=dtype, memory_format=torch.channels_last)
        conv.__class__ = FastConv2d
        x = torch.ones(1, 8, 4, 4, dtype=dtype).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            conv_add_relu(conv, conv_relu(conv, x), x)
            upsample_conv(conv, x)
        return True
    except RuntimeError:
        return False


class FastBlock(Block):
    """A ``Block`` whose forward runs fused oneDNN kernels; same submodules, same state_dict."""

    def amx_convs(self, x: torch.Tensor, shape: "tuple | None" = None) -> "tuple | None":
        """The block's three convs where our AMX kernel runs its body as one pass on x (or on a map of
        ``shape`` made from x later in a chain), else None."""
        shape = tuple(x.shape) if shape is None else tuple(shape)
        convs = (self.conv[0], self.conv[2], self.conv[4])
        if x.dtype == torch.bfloat16 and type(self.skip) is nn.Identity \
                and all(type(c) is FastConv2d and c.in_channels == c.out_channels == shape[1]
                        and c.uses_amx(x, shape=shape) for c in convs):
            return convs
        return None

    def amx_calls(self, x: torch.Tensor) -> "tuple[amx.Call | None, amx.Call | None]":
        """(pool branch, body) as prepared AMX kernel calls for x, each None where it does not run on
        it; kept until x's shape, the untiled size, $TAESD_AMX or a parameter changes."""
        pool = self.pool
        params = [p for c in self.conv if type(c) is FastConv2d for p in (c.weight, c.bias)]
        if pool is not None:
            params += [p for m in pool for p in m.parameters(recurse=False)]
        key = _call_key(x, params)
        kept = self.__dict__.get("_amx_calls")
        if kept is None or kept[0] != key:
            kept = self.__dict__["_amx_calls"] = (key, self._prepare_amx(x))
        return kept[1]

    def _prepare_amx(self, x: torch.Tensor) -> "tuple[amx.Call | None, amx.Call | None]":
        shape, pool_call = tuple(x.shape), None
        if self.pool is not None:
            up, norm, down = self.pool[0], self.pool[1], self.pool[3]
            if amx.supports_pool(self.pool, x) and type(up) is FastConv2d and type(down) is FastConv2d \
                    and amx.available():
                pool_call = amx.prepare_pool(shape, up.amx_1x1_weight(), down.amx_1x1_weight(), norm)
        convs = self.amx_convs(x)
        body = None if convs is None else amx.prepare_block(shape, [c.amx_weight() for c in convs],
                                                            [c.bias for c in convs])
        return pool_call, body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused_available(x, self):
            return super().forward(x)
        x = x.contiguous(memory_format=torch.channels_last)
        pool_call, body = self.amx_calls(x) if x.dtype == torch.bfloat16 else (None, None)
        if self.pool is not None:
            # x + pool(x): in bf16 on AMX CPUs one two-pass kernel (``amx.pool``; 0.31 ms against
            # 1.24 ms for PyTorch's five layers on a 64² map). The pool needs the whole map (its
            # GroupNorm), so tiles run it on the whole map too: same bits.
            x = pool_call(x) if pool_call is not None else x + self.pool(x)
        if body is not None:
            return body(x)
        body = self.conv
        h = conv_relu(body[2], conv_relu(body[0], x))
        return conv_add_relu(body[4], h, self.skip(x))

    def __getstate__(self):  # copies and pickles carry no prepared kernel call
        return without_caches(super().__getstate__(), BLOCK_CACHE)


BLOCK_CACHE = ("_amx_calls",)


def _params_key(params) -> tuple:
    """Changes when any of ``params`` does (see ``_weight_key``)."""
    return tuple(None if p is None else _weight_key(p) for p in params)


def _call_key(x: torch.Tensor, params) -> tuple:
    """What a prepared kernel call for x depends on: x's shape and dtype, the untiled size (decisions
    by map size), $TAESD_AMX and ``params``."""
    return (tuple(x.shape), x.dtype, untiled_pixels.get(), amx.available(), _params_key(params))


# ---------------------------------------------------------------- nearest 2x upsample + 3x3 conv

# Nearest 2x upsampling repeats each input row twice, so each output row of the 3x3 conv that
# follows sees only 2 distinct input rows: even rows x[i-1], x[i] with taps (w0, w1 + w2), odd rows
# x[i], x[i+1] with (w0 + w1, w2). Per output pixel that is a 2x2 conv on the small input: 4
# multiply-adds per channel pair instead of 9, and the 4x bigger upsampled map is never written.
PHASE_TAPS = (torch.tensor([[1., 0, 0], [0, 1, 1]]), torch.tensor([[1., 1, 0], [0, 0, 1]]))


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """3x3 weights (O, I, 3, 3) -> the four 2x2 phase kernels (4 * O, I, 2, 2), phases (a, b)
    in the order (0,0), (0,1), (1,0), (1,1)."""
    return torch.cat([torch.einsum("ik,ockl,jl->ocij", PHASE_TAPS[a], weight, PHASE_TAPS[b])
                      for a in (0, 1) for b in (0, 1)])


def upsample_conv(conv: FastConv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(nearest_upsample_2x(x)): our AMX kernel (bf16) or Winograd reading x upsampled on the
    fly, else one 2x2 conv giving all four phases and one interleave (fp32 only: in bf16 the summed
    phase weights round unlike the plain conv a tile runs, so bf16 upsamples, then convolves)."""
    if x.dtype == torch.bfloat16 and conv.uses_amx(x, upsample=True):
        return conv.amx_conv(x, upsample=True)
    m = conv.winograd_tile(x, upsample=True)
    if m:
        return winograd.conv3x3(x, conv.winograd_weight(m, x.dtype), conv.bias, m, upsample=True)
    if x.dtype == torch.bfloat16:
        # FastConv2d's own forward: ``conv`` may be a subclass whose forward upsamples again
        return FastConv2d.forward(conv, F.interpolate(x, scale_factor=2.0, mode="nearest"))
    x = x.contiguous(memory_format=torch.channels_last)
    n, _, h, w = x.shape
    c = conv.out_channels
    weight = conv.packed_upsample_weight(x)
    y = torch.ops.mkldnn._convolution_pointwise(x, weight, conv.__dict__["_up_bias"], [1, 1], [1, 1],
                                                [1, 1], 1, "none", [], None)   # (n, 4c, h+1, w+1)
    y = y.contiguous(memory_format=torch.channels_last)
    # Output pixel (2i + a, 2j + b), channel o is y[(a, b, o), i + a, j + b]: one strided view.
    s_n, s_row, s_col = (h + 1) * (w + 1) * 4 * c, (w + 1) * 4 * c, 4 * c
    phases = y.as_strided((n, h, 2, w, 2, c), (s_n, s_row, s_row + 2 * c, s_col, s_col + c, 1),
                          y.storage_offset())
    return phases.reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)


class UpsampleConv:
    """A step of ``FastSequential``: an Upsample and the conv after it, as ``upsample_conv``."""

    def __init__(self, conv: FastConv2d):
        self.conv = conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv(self.conv, x)


class ConvReLU:
    """A step of ``FastSequential``: a conv and the ReLU after it, as ``conv_relu`` (one kernel; the
    same bits as the two layers, which is what tiles run)."""

    def __init__(self, conv: FastConv2d):
        self.conv = conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return conv_relu(self.conv, x.contiguous(memory_format=torch.channels_last))


class AmxChain:
    """Steps of ``FastSequential`` that our AMX kernel runs as one pass (``amx.chain``) where each would
    run on it: a head (an upsample + conv, or the first conv from RGB as an im2col stage), then at most
    one residual block, then at most a stride-2 conv or the last conv (to at most 16 channels, a narrow
    stage); two steps at least. So a decoder stage's upsample + conv runs with the block after it (the
    last stage with the last conv too), an encoder stage's last block with the stride-2 conv after it
    (the last one with the conv to latents), and the encoder's first conv with its full-resolution block
    and the stride-2 conv. The maps between
    them never leave the cache; the bits are those of the steps run one after the other, which is what
    runs where the kernel does not apply (and in tiles, which run layer by layer). Measured on a 2-core
    Sapphire Rapids Xeon, 2 threads (benchmarks/AMX.md): 256² -> 512² upsample + conv + block 30.6 ->
    26.3 ms, 512² block + stride-2 conv 27.0 -> 22.5 ms; whole 512² decode 65.8 -> 56.7 ms and encode
    57.3 -> 51.4 ms (same process, alternated). Longer chains (a block and the next block, an upsample
    + conv and two blocks, a stride-2 conv and the block after it) measured 0-7% slower than shorter
    ones, so they are not made."""

    def __init__(self, steps: list):
        self.steps = steps
        self._kept = None   # (key, prepared call)

    @staticmethod
    def length(steps: list, i: int) -> int:
        """How many steps from ``steps[i]`` make a chain (0: none)."""
        k = i
        if k < len(steps) and (type(steps[k]) is UpsampleConv or _is_first_conv(steps[k])):
            k += 1
        if k < len(steps) and type(steps[k]) is FastBlock and steps[k].pool is None:
            k += 1
        if k < len(steps) and k > i and type(steps[k - 1]) is FastBlock and type(steps[k]) is FastConv2d \
                and (steps[k].stride == (2, 2) or _is_last_conv(steps[k])):
            k += 1
        return k - i if k - i >= 2 else 0

    def stages(self, x: torch.Tensor) -> "tuple[list, bool] | None":
        """The chain's stages and whether it reads x upsampled, or None where it does not apply."""
        if x.dim() != 4 or x.dtype != torch.bfloat16:
            return None
        n, c, h, w = x.shape
        shape, stages, upsample = (n, c, h, w), [], False
        for k, step in enumerate(self.steps):
            module = step.conv if type(step) is UpsampleConv else step
            if not fused_available(x, module):
                return None
            if type(step) is UpsampleConv:
                if not step.conv.uses_amx(x, upsample=True):
                    return None
                stages.append(amx.ChainStage(step.conv.amx_weight(), step.conv.out_channels, step.conv.bias))
                shape, upsample = (n, step.conv.out_channels, 2 * h, 2 * w), True
            elif type(step) is FastBlock:
                convs = step.amx_convs(x, shape)
                if convs is None:
                    return None
                stages += _block_stages(convs, skip=len(stages))
            elif k == 0:   # the first conv, from RGB
                if not step.uses_amx_im2col(x):
                    return None
                stages.append(step.amx_im2col_stage())
                shape = (n, step.out_channels, h, w)
            elif _is_last_conv(step):   # the last conv, to RGB
                if not step.uses_amx_narrow(x, shape):
                    return None
                stages.append(step.amx_narrow_stage())
            else:          # the stride-2 conv
                if not step.uses_amx(x, shape=shape):
                    return None
                stages.append(amx.ChainStage(step.amx_weight(), step.out_channels, step.bias, stride=2))
                shape = (n, step.out_channels, (shape[2] - 1) // 2 + 1, (shape[3] - 1) // 2 + 1)
        return stages, upsample

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        call = self.prepared(x)
        if call is None:
            for step in self.steps:
                x = step(x)
            return x
        return call(x)

    def prepared(self, x: torch.Tensor) -> "amx.Call | None":
        """The chain as a prepared kernel call for x (None where it does not apply), kept until x's
        shape, the untiled size, $TAESD_AMX, autograd or a parameter changes."""
        modules = [s.conv if type(s) is UpsampleConv else s for s in self.steps]
        if not all(fused_available(x, m) for m in modules):
            return None
        key = _call_key(x, [p for m in modules for p in m.parameters()])
        if self._kept is None or self._kept[0] != key:
            plan = self.stages(x)
            self._kept = (key, None if plan is None else _prepare(tuple(x.shape), *plan))
        return self._kept[1]


# A chain whose rings of rows (3 rows of each map it reads, 4 of a block's input) outgrow RING_LIMIT
# runs in column strips of about STRIP_RING_BYTES of rings each (the AMX Xeons have 2 MiB of L2 per
# core, shared with the weights and the rows in flight). Measured on the 2-core Sapphire Rapids: the
# decoder's last chain to 1024² (rings 2.0 MiB) whole decode 191.6 -> 182.2 ms in 2 strips (4 were
# slower); the encoder's first chain from 1024² (rings 1.7 MiB) 78.0 ms whole, 80.5 ms in 2 strips,
# from 2048² (3.4 MiB) 352.7 ms whole, 329.2 ms in 3.
RING_LIMIT = 1.8 * 2 ** 20
STRIP_RING_BYTES = 2 ** 20


def ring_bytes(shape: tuple, stages: list, upsample: bool) -> int:
    """About the bytes of the rows a chain keeps of its maps (bf16; the kernel pads them a little more)."""
    n, c, h, w = shape
    w *= 2 if upsample else 1
    skips = {s.skip for s in stages if s.skip is not None}
    total = 0
    for k, s in enumerate(stages):   # stage k reads map k (w wide, c channels)
        if s.im2col:
            total += w * amx.PATCH * 2
        else:
            total += (4 if k in skips else 3) * (w + 2) * c * 2
        c, w = s.out_channels, (w - 1) // s.stride + 1
    return total


def _prepare(shape: tuple, stages: list, upsample: bool):
    """``amx.prepare_chain``, or ``ColumnStrips`` of it where its rings would outgrow the L2."""
    rings = ring_bytes(shape, stages, upsample)
    if rings > RING_LIMIT:
        return ColumnStrips(shape, stages, upsample, max(2, round(rings / STRIP_RING_BYTES)))
    return amx.prepare_chain(shape, stages, upsample)


class ColumnStrips:
    """A chain run on ``parts`` column strips of its input, each with the input columns its outputs read
    (their receptive field: one column per conv at that conv's input resolution), the strip starting
    where an output column does (a stride-2 chain: an even column). The outputs that read a strip's zero
    edges are not kept; the kept ones the kernel writes where they go in the whole output, and it reads
    each strip where it lies in x. Per output pixel the kernel's sums are the same whatever the map, so
    the strips give the bits of the whole (tests/test_amx.py)."""

    def __init__(self, shape: tuple, stages: list, upsample: bool, parts: int):
        n, c, h, w = shape
        f = 2 if upsample else 1
        stride, reach, out_h, out_w = 1, 0, h * f, w * f
        for s in stages:   # read columns per output column, and the reach at the read resolution
            reach += stride
            stride *= s.stride
            out_h, out_w = (out_h - 1) // s.stride + 1, (out_w - 1) // s.stride + 1
        self.pieces = []
        for i in range(parts):
            a, b = out_w * i // parts, out_w * (i + 1) // parts
            a0 = max((a * stride - reach) // f, 0)
            while a0 * f % stride:   # the strip's first read column is an output column's
                a0 -= 1
            b0 = min(-(-((b - 1) * stride + reach + 1) // f), w)
            call = amx.prepare_chain((n, c, h, b0 - a0), stages, upsample)
            self.pieces.append((a0, b0, a, b, a - a0 * f // stride, call))
        self.out_shape = (n, stages[-1].out_channels, out_h, out_w)
        self.in_shape, self.what = tuple(shape), f"chain of {len(stages)} convs in {parts} strips"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.in_shape:
            raise ValueError(f"{self.what} was prepared for {self.in_shape}, got {tuple(x.shape)}")
        x = x.contiguous(memory_format=torch.channels_last)   # each strip is then read in place
        y = torch.empty(self.out_shape, dtype=x.dtype, memory_format=torch.channels_last)
        for a0, b0, a, b, first, call in self.pieces:
            call.into(x[..., a0:b0], y[..., a:b], first)
        return y


def _is_last_conv(step) -> bool:
    return type(step) is FastConv2d and step.stride == (1, 1) and step.out_channels <= amx.NARROW \
        and step.kernel_size == (3, 3)


def _is_first_conv(step) -> bool:
    return type(step) is FastConv2d and step.stride == (1, 1) and 9 * step.in_channels <= amx.PATCH \
        and step.kernel_size == (3, 3)


def _block_stages(convs, skip: int) -> list:
    """A residual block's three convs as chain stages; ``skip``: the index of the block's input map."""
    return [amx.ChainStage(c.amx_weight(), c.out_channels, c.bias, relu=True, skip=skip if k == 2 else None)
            for k, c in enumerate(convs)]


def _fuses_upsample(up: nn.Module, conv: nn.Module) -> bool:
    return (type(up) is nn.Upsample and up.mode == "nearest" and up.size is None
            and up.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0)) and type(conv) is FastConv2d
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


# Per-image activations at least this big run image by image (a batch of them would not stay in
# cache); smaller ones (the low-resolution stages) run as one batch, which keeps 2+ cores busy.
# None: $TAESD_PER_IMAGE_BYTES or 16 MiB (settings.per_image_bytes), read per call.
PER_IMAGE_BYTES: "int | None" = None


class FastSequential(nn.Sequential):
    """``nn.Sequential`` that runs an Upsample followed by its 3x3 conv as ``upsample_conv``, and
    a batch's high-resolution layers one image at a time. Indexing and slicing behave as before (a
    slice is a FastSequential; a layer run alone is the plain layer)."""

    def _steps(self, x: torch.Tensor) -> list:
        """The steps for x (kept while its dtype, autograd, $TAESD_AMX and the layers stay): the
        chains keep their prepared kernel calls between calls."""
        layers = list(self)
        key = (x.dtype, fused_available(x, self), amx.available(), tuple(map(id, layers)))
        kept = self.__dict__.get("_kept_steps")
        if kept is None or kept[0] != key:
            kept = self.__dict__["_kept_steps"] = (key, self._make_steps(x, layers))
        return kept[1]

    def _make_steps(self, x: torch.Tensor, layers: list) -> list:
        steps, i = [], 0
        while i < len(layers):
            # (bf16 never takes the phase kernels: ``upsample_conv``)
            if i + 1 < len(layers) and _fuses_upsample(layers[i], layers[i + 1]) \
                    and fused_available(x, layers[i + 1]) and x.dtype in (torch.float32, torch.bfloat16):
                steps.append(UpsampleConv(layers[i + 1]))
                i += 2
            elif i + 1 < len(layers) and type(layers[i]) is FastConv2d and type(layers[i + 1]) is nn.ReLU \
                    and fused_available(x, layers[i]):
                steps.append(ConvReLU(layers[i]))   # the decoder's first conv
                i += 2
            else:
                steps.append(layers[i])
                i += 1
        if x.dtype != torch.bfloat16 or not amx.available():
            return steps
        chained, i = [], 0
        while i < len(steps):
            k = AmxChain.length(steps, i)
            chained.append(AmxChain(steps[i:i + k]) if k else steps[i])
            i += k or 1
        return chained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self._steps(x)
        n = x.shape[0] if x.dim() == 4 else 1
        fused = fused_available(x, self)
        if n == 1 and fused and x.dtype == torch.bfloat16 and amx.available():
            return self._replayed(x, steps)
        if n == 1 or not fused:
            for step in steps:
                x = step(x)
            return x
        # Every layer here is per-sample (GroupNorm included), so splitting the batch is exact.
        i, per_image = 0, PER_IMAGE_BYTES or settings.per_image_bytes()
        while i < len(steps):
            if x[:1].nbytes < per_image:
                x = steps[i](x)
                i += 1
                continue
            outs, end = [], i
            for k in range(n):   # a run of big layers, image by image, until the maps are small again
                h, end = x[k:k + 1], i
                while end < len(steps) and (end == i or h.nbytes >= per_image):
                    h = steps[end](h)
                    end += 1
                outs.append(h)
            x, i = torch.cat(outs), end
        return x

    def _replayed(self, x: torch.Tensor, steps: list) -> torch.Tensor:
        """The steps on x, their prepared AMX kernel calls (blocks, chains, pool branches) recorded on
        the first call for x's shape and replayed back to back after it, without each step's checks
        between them (~0.1 ms of Python per step in the network; the same kernels, the same bits).
        Recorded again when the shape, the untiled size, a parameter or the module tree changes."""
        key = (tuple(x.shape), untiled_pixels.get(), self._versions())
        kept = self.__dict__.get("_program")
        if kept is not None and kept[0] == key and kept[1] is steps:
            for item in kept[2]:
                x = item(x)
            return x
        items = []
        for step in steps:
            calls = _calls_of(step, x)
            for call in calls or (step,):
                x = call(x)
            items += calls or [step]
        self.__dict__["_program"] = (key, steps, items)
        return x

    def _versions(self) -> tuple:
        """Changes when a parameter of this part does: its storage or version (the list of them is
        kept until any module in the process gets a new parameter or submodule)."""
        kept = self.__dict__.get("_params")
        if kept is None or kept[0] != _tree_changes[0]:
            kept = self.__dict__["_params"] = (_tree_changes[0], list(self.parameters()))
        try:
            return tuple((p.data_ptr(), p._version) for p in kept[1])
        except RuntimeError:   # an inference tensor has no version counter
            return _params_key(kept[1])

    def __getstate__(self):  # copies and pickles carry no kept steps
        return without_caches(super().__getstate__(), SEQUENTIAL_CACHE)


SEQUENTIAL_CACHE = ("_kept_steps", "_program", "_params")

# Bumped whenever any module in the process gets a parameter or a submodule (assignment, replacement):
# the kept parameter lists above are then gathered again.
_tree_changes = [0]


def _tree_changed(*_) -> None:
    _tree_changes[0] += 1


nn.modules.module.register_module_parameter_registration_hook(_tree_changed)
nn.modules.module.register_module_module_registration_hook(_tree_changed)


def _calls_of(step, x: torch.Tensor) -> "list | None":
    """The prepared AMX kernel calls a step makes on x, in order, where that is all it does; else None."""
    if type(step) is AmxChain:
        call = step.prepared(x)
        return None if call is None else [call]
    if type(step) is FastBlock and fused_available(x, step):
        pool_call, body = step.amx_calls(x)
        if body is not None and (step.pool is None or pool_call is not None):
            return [pool_call, body] if pool_call is not None else [body]
    return None


# ---------------------------------------------------------------- the executor

# Winograd tile size per part (0: direct convolution). Decoded pixels tolerate F(4x4,3x3). The
# encoder's latents amplify the rounding of its downsampled stages, so those get the more exact
# F(2x2,3x3); its full-resolution layers (before the first stride-2 conv; 40% of its time) keep
# F(4x4): measured on taef2's real weights, astronaut 1024², latents 5.0e-5 off float64 against
# 5.6e-5 with F(2x2) everywhere and 5.3e-4 with F(4x4) everywhere (docs/performance.md).
WINOGRAD_TILES = {"encoder": 2, "decoder": 4}
FULL_RESOLUTION_TILES = {"encoder": 4}
# In bf16 (AVX-512-BF16 CPUs without AMX) every Winograd conv takes F(4x4,3x3): bf16's own rounding
# outweighs what F(2x2) saves. taef2's real weights, 512² photos, AMD Zen 4: decode 47.7-52.8 dB and
# encode 54.3-58.7 dB against fp32 (F(2x2) in the encoder: 56.3-60.9 dB, 1.4x slower).
BF16_WINOGRAD_TILE = 4
TABLE = {Block: FastBlock, nn.Conv2d: FastConv2d}
ROOT = {nn.Sequential: FastSequential}   # the part itself (a Block's inner Sequential stays plain)
CACHES = (*PACK_CACHE, *BLOCK_CACHE, *SEQUENTIAL_CACHE, "winograd")


def winograd_tiles(part: str, module: nn.Module, bf16: bool = False):
    """(conv, tile size) for each ``FastConv2d`` of a part, in forward order: the part's tile size,
    or its full-resolution one up to the first strided convolution; ``BF16_WINOGRAD_TILE`` for every
    one of them where the part computes in bf16."""
    full = FULL_RESOLUTION_TILES.get(part)
    for sub in module.modules():
        if type(sub) is FastConv2d:
            if sub.stride != (1, 1):
                full = None
            yield sub, winograd_tile_of(full or WINOGRAD_TILES.get(part, 0), bf16, sub)


# Wide layers (TAEHV's 128-1024 channels): the kernel reads a conv's whole transformed weight
# ((m+2)^2 x Ci x Co) once per block of 12 tiles; where it no longer stays in the last-level cache
# the GEMMs starve. Measured (fp32, 3 frames), 2-core Zen 3 with a 32 MiB L3: 256 -> 512 at 64²,
# F(4x4) (18 MiB) 221 ms, F(2x2) (8 MiB) 115 ms, oneDNN 212 ms; 512 -> 256: 118 / 102 / 158 ms;
# 256 -> 256 (9 MiB) F(4x4) 36 ms, F(2x2) 46 ms; 512 -> 1024 at 32², F(2x2) (32 MiB) 386 ms, oneDNN
# 190 ms. 2-core Xeon with a 480 MiB L3: 256 -> 512 F(4x4) 49 ms, F(2x2) 77 ms, oneDNN 96 ms;
# 512 -> 256: 51 / 82 / 98 ms; 512 -> 1024 F(4x4) (72 MiB) 109 ms, F(2x2) 100 ms, oneDNN 98 ms.
# So the limit is 3/8 of the L3 (12 MiB at 32 MiB), between WIDE_WEIGHT_BYTES and WIDE_WEIGHT_MAX;
# WIDE_WEIGHT_BYTES where the L3's size is unknown.
WIDE_WEIGHT_BYTES = 12 * 2 ** 20
WIDE_WEIGHT_MAX = 48 * 2 ** 20


def wide_weight_bytes() -> int:
    """The biggest transformed weight a Winograd tile may have on this CPU (see WIDE_WEIGHT_BYTES)."""
    l3 = isa.l3_cache_bytes()
    return WIDE_WEIGHT_BYTES if not l3 else min(max(l3 * 3 // 8, WIDE_WEIGHT_BYTES), WIDE_WEIGHT_MAX)


def winograd_tile_of(m: int, bf16: bool, conv: "nn.Conv2d | None" = None) -> int:
    """The tile a conv planned for F(m x m) in fp32 runs with: F(4x4) where its part computes in bf16
    (where bf16 runs the Winograd kernel at all: not on AMX CPUs, whose tiles do not need this plan),
    and for a wide ``conv`` the biggest tile whose transformed weight fits ``wide_weight_bytes()``
    (F(2x2), else 0: direct)."""
    wino_bf16 = bf16 and isa.winograd_bf16()
    m = BF16_WINOGRAD_TILE if m and wino_bf16 else m
    if conv is not None:
        per_point = conv.in_channels * conv.out_channels * (2 if wino_bf16 else 4)
        limit = wide_weight_bytes()
        while m and (m + 2) ** 2 * per_point > limit:
            m = 2 if m > 2 else 0
    return m


def cpu_compute_dtype(dtype: torch.dtype, device: torch.device, bf16: "bool | None" = None) -> torch.dtype:
    """What a model whose weights are ``dtype`` on ``device`` computes in on the CPU executors (image
    and video): an fp32 model on a CPU computes in bf16 where ``bf16`` says so (None:
    ``$TAESD_CPU_BF16``, else this CPU's rule, ``taesd.runtime.isa.default_dtype``) and the CPU runs it
    natively; any other model in its own dtype."""
    if dtype != torch.float32 or device.type != "cpu":
        return dtype
    if bf16 is None:
        bf16 = settings.cpu_bf16()
    if bf16 is None:
        bf16 = isa.default_dtype() == torch.bfloat16
    if bf16 and torch.backends.mkldnn.is_available() and native(torch.bfloat16):
        return torch.bfloat16
    return torch.float32


@dataclasses.dataclass(frozen=True)
class CpuExecutor(Executor):
    """The CPU executor (see the module docstring). ``allocator=False`` leaves the process allocator
    alone; ``use_winograd=False`` (or ``TAESD_WINOGRAD=0``) keeps every convolution direct
    (bit-identical to the plain network in fp32). ``bf16``: whether an fp32 model computes in bf16
    (weights rounded once, activations bf16, inputs and outputs fp32); None: ``$TAESD_CPU_BF16``,
    else where this CPU has native bf16: AMX or AVX-512-BF16 (``taesd.runtime.isa.default_dtype``).
    An explicit ``dtype=`` at load sets it False."""

    name = "cpu"
    allocator: bool = True
    use_winograd: bool = True
    bf16: "bool | None" = None

    def applies(self, model) -> bool:
        return model.device.type == "cpu"

    def compute_dtype(self, model) -> torch.dtype:
        return cpu_compute_dtype(model.dtype, model.device, self.bf16)

    def winograd_on(self) -> bool:
        """Winograd runs: asked for, switched on and compiled (else tiling plans for direct convs)."""
        return self.use_winograd and winograd.available()

    def transform(self, model) -> None:
        if self.allocator and model.device.type == "cpu":
            tune_allocator()
        _warn_emulated(model)
        use_winograd = self.winograd_on()
        # Tiles are planned for the precision the model computes in now (tiling aligns to them)
        bf16 = self.compute_dtype(model) == torch.bfloat16
        for part in model.parts:
            module = model.part(part)
            module.to(memory_format=torch.channels_last)
            swap(module, TABLE, ROOT)
            for conv, m in winograd_tiles(part, module, bf16):
                conv.winograd = m if use_winograd else 0

    def restore(self, model) -> None:
        for part in model.parts:
            module = model.part(part)
            unswap(module, TABLE, ROOT, CACHES)
            module.to(memory_format=torch.contiguous_format)

    def tile_alignment(self, conv: nn.Module) -> int:
        m = getattr(conv, "winograd", 0) or 0
        if m and isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1):
            return int(m)
        return 0

    @property
    def memory_overhead(self) -> float:
        # oneDNN's direct convolutions hold more beside their input and output than the Winograd kernel.
        return settings.tile_overhead(direct=not self.winograd_on())


def _warn_emulated(model) -> None:
    if model.device.type == "cpu" and model.dtype in (torch.bfloat16, torch.float16) \
            and not (torch.backends.mkldnn.is_available() and native(model.dtype)):
        name = str(model.dtype).removeprefix("torch.")
        warnings.warn(f"{name} has no native kernels on this CPU (it needs AVX-512 BF16/FP16, AMX or "
                      "AVX-NE-CONVERT) and runs emulated, slower than the fp32 default", stacklevel=4)


def make_fast(model, allocator: bool = True, use_winograd: bool = True):
    """``CpuExecutor(allocator, use_winograd).apply(model)``: the CPU executor, in place."""
    return CpuExecutor(allocator=allocator, use_winograd=use_winograd).apply(model)


def make_plain(model):
    """Back to the plain modules (the allocator setting stays)."""
    executor = getattr(model, "executor", None) or CpuExecutor()
    return executor.undo(model)
