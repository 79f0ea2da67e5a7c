"""Our own GPU kernels for the CUDA executor, to A/B against cuDNN (benchmarks/bench_gpu.py kernels).

Two ideas, both exact up to floating-point rounding against the plain network:

- sub-pixel upsample+conv: nearest 2x upsampling then a 3x3 conv is one transposed convolution of
  the small map, stride 2, with 4x4 kernels built from the 3x3 ones (per axis the taps
  ``[w2, w1 + w2, w0 + w1, w0]``). Each output pixel then sees 2x2 taps instead of 3x3 and the 4x
  bigger upsampled map is never written: cuDNN's strided-dgrad kernels compute the four phases and
  write them interleaved. ``SubpixelConv2d`` runs it (``mode="tconv"``) or runs the Triton kernel
  below in its phase mode (``mode="triton"``: four 2x2 phase kernels, interleaved strided stores).
- ``conv3x3_nhwc``: a Triton implicit-GEMM 3x3 convolution on NHWC (channels_last) fp16/bf16 tensors,
  fp32 accumulation, with bias, residual add and ReLU fused into its epilogue. ``TritonBlock`` runs a
  residual ``Block`` as three such launches (conv+ReLU, conv+ReLU, conv+residual+ReLU).

``rewrite(seq)`` swaps these in place (same parameters, same ``state_dict`` keys and indices: the
Upsample becomes an identity, the conv after it the sub-pixel module), so a model made by the CUDA
executor keeps its graph capture around the rewritten layers. ``available()`` says whether the Triton
kernels can run (a CUDA device and triton, or ``TRITON_INTERPRET=1`` on the CPU for tests).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from taesd.nn.layers import Block

try:  # triton ships with CUDA builds of torch; the CPU build has none unless installed
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Per axis, the 4 taps of the transposed conv from the 3 taps of the 3x3 conv (k = d + 1 where the
# output row is 2i + d): d=-1 sees w2, d=0 w1+w2, d=1 w0+w1, d=2 w0.
TCONV_TAPS = torch.tensor([[0.0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]])
# Per axis and phase a (output row 2i + a), the 2 taps on small rows i + a - 1 and i + a.
PHASE_TAPS = (torch.tensor([[1.0, 0, 0], [0, 1, 1]]), torch.tensor([[1.0, 1, 0], [0, 0, 1]]))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip() == "1"


def available(device="cuda") -> bool:
    """Whether the Triton kernels run on ``device``: triton importable and a CUDA device (or the
    Triton interpreter, ``TRITON_INTERPRET=1``, for CPU tensors)."""
    if triton is None:
        return False
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    return interpreting()


# ---------------------------------------------------------------- weights


def tconv_weight(weight: torch.Tensor) -> torch.Tensor:
    """3x3 conv weights (O, I, 3, 3) -> the stride-2 transposed-conv weights (I, O, 4, 4) of
    nearest-2x-upsample-then-conv (padding 1). Sums in fp64, then the weight's dtype."""
    taps = TCONV_TAPS.to(weight.device, torch.float64)
    return torch.einsum("tk,oikl,ul->iotu", taps, weight.double(), taps).to(weight.dtype)


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """3x3 conv weights (O, I, 3, 3) -> the four 2x2 phase kernels laid out for the Triton kernel:
    (phase = 2a + b, tap row, tap col, I, O), contiguous."""
    taps = [t.to(weight.device, torch.float64) for t in PHASE_TAPS]
    w = weight.double()
    out = [torch.einsum("ik,ockl,jl->ijco", taps[a], w, taps[b]) for a in (0, 1) for b in (0, 1)]
    return torch.stack(out).to(weight.dtype).contiguous()


def gemm_weights(weight: torch.Tensor) -> torch.Tensor:
    """3x3 conv weights (O, I, 3, 3) -> (1, 3, 3, I, O) contiguous: the Triton kernel's B operand."""
    return weight.permute(2, 3, 1, 0).unsqueeze(0).contiguous()


def _cached(module: nn.Module, name: str, make) -> torch.Tensor:
    """A weight derived from ``module.weight``, remade when the weight changes (in place or not)."""
    w = module.weight
    version = None if w.is_inference() else w._version  # inference tensors have no version counter
    key = (w.data_ptr(), w.dtype, w.device, version)
    hit = module.__dict__.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, make(w.detach()))
        module.__dict__[name] = hit
    return hit[1]


# ---------------------------------------------------------------- the Triton kernel

if triton is not None:

    @triton.jit
    def _conv_kernel(
        x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
        N, H, W, OH, OW, O,
        sxn, sxh, sxw, sxc, syn, syh, syw, syc, srn, srh, srw, src,
        C: tl.constexpr, STRIDE: tl.constexpr, TAPS: tl.constexpr, PHASES: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Rows of the GEMM: output pixels (n, oh, ow) of one phase; columns: output channels;
        # reduction: TAPS x TAPS taps x C input channels, read straight from the NHWC input.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        phase = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < N * OH * OW
        mask_n = offs_n < O
        ow = offs_m % OW
        t = offs_m // OW
        oh = t % OH
        n = t // OH
        if PHASES == 4:  # sub-pixel: phase (a, b) reads small rows i + a - 1, i + a
            pa = phase // 2
            pb = phase % 2
            base_h = oh + pa - 1
            base_w = ow + pb - 1
            yh = 2 * oh + pa
            yw = 2 * ow + pb
        else:
            base_h = oh * STRIDE - 1
            base_w = ow * STRIDE - 1
            yh = oh
            yw = ow
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kh in tl.static_range(TAPS):
            for kw in tl.static_range(TAPS):
                ih = base_h + kh
                iw = base_w + kw
                valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                row = n * sxn + ih * sxh + iw * sxw
                tap = ((phase * TAPS + kh) * TAPS + kw) * C
                for k0 in tl.static_range(0, C, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    mask_k = offs_k < C
                    a = tl.load(x_ptr + row[:, None] + offs_k[None, :] * sxc,
                                mask=valid[:, None] & mask_k[None, :], other=0.0)
                    b = tl.load(w_ptr + (tap + offs_k)[:, None] * O + offs_n[None, :],
                                mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                    acc += tl.dot(a, b)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_RES:
            res = r_ptr + (n * srn + yh * srh + yw * srw)[:, None] + offs_n[None, :] * src
            acc += tl.load(res, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            acc = tl.maximum(acc, 0.0)
        out = y_ptr + (n * syn + yh * syh + yw * syw)[:, None] + offs_n[None, :] * syc
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _pow2(v: int, lo: int, hi: int) -> int:
    p = lo
    while p < v and p < hi:
        p *= 2
    return p


# Launch shape of conv3x3_nhwc: rows of output pixels per program, warps, pipelining depth.
# benchmarks/bench_kernels.py sweeps alternatives on the GPU and reports the fastest.
CONFIG = {"block_m": 128, "num_warps": 4, "num_stages": 2}


def conv3x3_nhwc(x, weights, bias=None, residual=None, relu=False, stride=1, phases=1, config=None):
    """One launch: y = [relu](conv(x) + bias [+ residual]), NHWC in and out (channels_last NCHW
    tensors). ``weights`` from ``gemm_weights`` (phases=1, 3x3 taps, ``stride`` 1 or 2, padding 1)
    or ``phase_weights`` (phases=4: nearest-2x upsample + 3x3 conv, output twice the size).
    ``config``: launch shape overrides of ``CONFIG``."""
    cfg = {**CONFIG, **(config or {})}
    block_m = cfg["block_m"]
    if triton is None:
        raise RuntimeError("triton is not installed")
    n, c, h, w = x.shape
    taps = 3 if phases == 1 else 2
    o = weights.shape[-1]
    if phases == 4:
        oh, ow, out_h, out_w = h, w, 2 * h, 2 * w
    else:
        oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
        out_h, out_w = oh, ow
    y = torch.empty((n, o, out_h, out_w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    r = residual if residual is not None else y
    b = bias if bias is not None else weights
    block_n = _pow2(o, 16, 64)
    block_k = _pow2(c, 16, 64)
    grid = (triton.cdiv(n * oh * ow, block_m), triton.cdiv(o, block_n), phases)
    _conv_kernel[grid](
        x, weights, b, r, y, n, h, w, oh, ow, o,
        x.stride(0), x.stride(2), x.stride(3), x.stride(1),
        y.stride(0), y.stride(2), y.stride(3), y.stride(1),
        r.stride(0), r.stride(2), r.stride(3), r.stride(1),
        C=c, STRIDE=stride, TAPS=taps, PHASES=phases, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, RELU=relu, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


# ---------------------------------------------------------------- modules (class swaps)


def _triton_ok(x: torch.Tensor) -> bool:
    return available(x.device) and not (torch.is_grad_enabled() and x.requires_grad)


class FoldedUpsample(nn.Upsample):
    """A nearest-2x Upsample whose work the next layer (``SubpixelConv2d``) does: the identity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SubpixelConv2d(nn.Conv2d):
    """conv3x3(nearest_upsample_2x(x)) from the small map ``x``: a stride-2 transposed conv
    (``mode`` "tconv", any device) or the Triton phase kernel (``mode`` "triton")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.__dict__.get("subpixel_mode") == "triton" and _triton_ok(x):
            weights = _cached(self, "_phase_w", phase_weights)
            return conv3x3_nhwc(x.contiguous(memory_format=torch.channels_last), weights, self.bias, phases=4)
        weight = _cached(self, "_tconv_w", _tconv_weight_nhwc)
        return F.conv_transpose2d(x, weight, self.bias, stride=2, padding=1)


def _tconv_weight_nhwc(weight: torch.Tensor) -> torch.Tensor:
    """``tconv_weight`` in channels_last, the layout cuDNN's NHWC kernels read without a transpose."""
    return tconv_weight(weight).contiguous(memory_format=torch.channels_last)


def _triton_conv(conv: nn.Conv2d, x, residual=None, relu=False) -> torch.Tensor:
    x = x.contiguous(memory_format=torch.channels_last)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    weights = _cached(conv, "_gemm_w", gemm_weights)
    return conv3x3_nhwc(x, weights, conv.bias, residual, relu, stride=conv.stride[0])


def _is_3x3(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.stride in ((1, 1), (2, 2)))


class TritonConv2d(nn.Conv2d):
    """A 3x3 conv (stride 1 or 2, padding 1) run by ``conv3x3_nhwc`` where the kernels are
    available; the plain conv elsewhere and under autograd."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _triton_ok(x):
            return _triton_conv(self, x)
        return super().forward(x)


class TritonBlock(Block):
    """A residual ``Block`` as three Triton launches with fused epilogues: conv+ReLU, conv+ReLU,
    conv+skip+ReLU; the plain forward where the kernels are unavailable or autograd records."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _triton_ok(x):
            return Block.forward(self, x)
        if self.pool is not None:
            x = x + self.pool(x)
        c = self.conv
        h = _triton_conv(c[0], x, relu=True)
        h = _triton_conv(c[2], h, relu=True)
        return _triton_conv(c[4], h, residual=self.skip(x), relu=True)


def _upsample_pair(up: nn.Module, conv: nn.Module) -> bool:
    return (isinstance(up, nn.Upsample) and up.mode == "nearest" and up.size is None
            and up.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0)) and _is_3x3(conv) and conv.stride == (1, 1))


def rewrite(seq: nn.Sequential, subpixel: "str | None" = "tconv", triton_convs: bool = False):
    """Swap our kernels into ``seq`` in place and return it: every nearest-2x Upsample + 3x3 conv
    pair becomes ``FoldedUpsample`` + ``SubpixelConv2d`` (``subpixel``: "tconv", "triton", or None to
    keep the pair), and with ``triton_convs`` every other 3x3 conv runs ``conv3x3_nhwc`` and every
    ``Block`` (without a pool) ``TritonBlock``. Parameters and ``state_dict`` keys are unchanged."""
    layers = list(seq)
    for i, layer in enumerate(layers):
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if subpixel and nxt is not None and _upsample_pair(layer, nxt):
            layer.__class__ = FoldedUpsample
            nxt.__class__ = SubpixelConv2d
            nxt.__dict__["subpixel_mode"] = subpixel
    if triton_convs:
        for sub in seq.modules():
            if isinstance(sub, Block) and sub.pool is None and all(_is_3x3(sub.conv[k]) for k in (0, 2, 4)):
                sub.__class__ = TritonBlock
            elif type(sub) is nn.Conv2d and _is_3x3(sub):
                sub.__class__ = TritonConv2d
    return seq
