"""Winograd convolution for the 3x3 layers: fewer multiplies than direct convolution.

A 3x3, stride-1 convolution computed tile by tile as ``A^T [(G g G^T) * (B^T d B)] A`` needs
(m+2)^2 instead of 9 m^2 multiply-adds per m x m output tile and channel pair: 2.25x fewer for
F(2x2,3x3), 4x fewer for F(4x4,3x3). TAESD spends ~95% of its FLOPs in 64->64 3x3 convolutions, so
this is the one way below the direct-convolution floor on a CPU (docs/performance.md).

The kernel is ``_winograd.cpp`` (AVX2/FMA, fused bias + residual + ReLU; its GEMM and transforms in
AVX-512 where the CPU has it, ``gemm_width``), compiled on first use with the machine's C++ compiler
(``taesd.runtime.native``) and called through ctypes. Without a
compiler, off x86-64, or with ``TAESD_WINOGRAD=0``, the fast executor uses oneDNN's direct
convolution instead.

Accuracy, fp32 (measured on taef2's real weights and photos, tests/test_winograd.py): F(4x4) in the
decoder changes decoded pixels by <= 1e-5; the encoder uses F(4x4) only at full resolution and the
more exact F(2x2) after its first downsampling, because its latents amplify the rounding of those
stages (plain eager fp32 is itself up to 1.2e-4 off a float64 reference there; ours stays within
1e-5 of the latents' range, ``executors.cpu.WINOGRAD_TILES``).

bf16 (CPUs with AVX-512-BF16): activations and the transformed weights in bf16, vdpbf16ps dot
products summing in fp32. F(4x4)'s transforms magnify bf16 rounding (a layer: ~4e-2 of its output's
range against ~4e-3 with F(2x2)), but whole decodes and encodes of the real weights stay at
47.7-52.8 dB / 54.3-58.7 dB against fp32 (AMD Zen 4, 512² photos), so bf16 runs F(4x4) everywhere
(``executors.cpu.BF16_WINOGRAD_TILE``): 1.3-1.4x faster than F(2x2) there.
"""
from __future__ import annotations

import ctypes
import subprocess
import threading
from pathlib import Path

import torch

from taesd import settings
from taesd.runtime import isa, native

ENV_SWITCH = "TAESD_WINOGRAD"
ENV_CACHE = "TAESD_CACHE_DIR"
SOURCE = Path(__file__).with_name("_winograd.cpp")
TILES = (2, 4)
# Below this many output pixels per image the direct convolution is as fast and exact.
MIN_PIXELS = 48 * 48

# Winograd weight transforms G (Lavin & Gray 2015), applied in float64 before rounding to fp32.
_G = {
    2: [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
    4: [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
}

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lock = threading.Lock()


def enabled() -> bool:
    return settings.winograd()


def cache_dir() -> Path:
    return settings.cache_dir()


def library_path() -> Path:
    return native.library_path(SOURCE, "winograd")


def build(force: bool = False) -> Path:
    """Compile the kernel into the cache (``taesd.runtime.native``). Raises RuntimeError with the
    reason when it cannot."""
    return native.build(SOURCE, "winograd", needs=("avx2", "fma"), force=force)


def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it on first use; None (with ``load_error()`` saying why) when
    it cannot be built or is switched off."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        try:
            lib = ctypes.CDLL(str(build()))
            fn = lib.taesd_winograd_conv
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                           ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int]
            fn.restype = ctypes.c_int
            lib.taesd_winograd_width.argtypes = [ctypes.c_int]
            lib.taesd_winograd_width.restype = ctypes.c_int
            lib.taesd_winograd_has_bf16.restype = ctypes.c_int
            _lib = lib
        except (RuntimeError, OSError, subprocess.SubprocessError, AttributeError) as e:
            _lib_error = str(e)
    return _lib


def load_error() -> str | None:
    return _lib_error


def available() -> bool:
    return enabled() and library() is not None


def gemm_width(bits: int = 0) -> int:
    """The kernel's vector width (GEMM and transforms): 512 where it was built for an AVX-512 CPU,
    else 256.
    ``bits`` (256 or 512) switches it for the process (benchmarks and tests compare the two);
    0 only asks. 0 back when the kernel is not available."""
    lib = library()
    return 0 if lib is None else lib.taesd_winograd_width(int(bits))


def bf16_available() -> bool:
    """The kernel runs bf16 activations here (built for a CPU with AVX-512-BF16)."""
    lib = library() if enabled() else None
    return lib is not None and bool(lib.taesd_winograd_has_bf16())


def transform_weight(weight: torch.Tensor, m: int, dtype: "torch.dtype | None" = None) -> torch.Tensor:
    """(O, I, 3, 3) -> U ((m+2)^2, I, O) fp32: G g G^T per channel pair, computed in float64.
    For the bf16 kernel (``dtype=torch.bfloat16``, the default for a bf16 weight) U is rounded once
    from float64 and laid out as ((m+2)^2, I/2, O, 2): the input-channel pairs that one bf16
    dot-product instruction takes. An fp32 weight computed in bf16 is transformed from its fp32
    values (one rounding, of U, instead of two)."""
    dtype = weight.dtype if dtype is None else dtype
    G = torch.tensor(_G[m], dtype=torch.float64)
    a = m + 2
    u = torch.einsum("ky,oiyx,lx->klio", G, weight.detach().to("cpu", torch.float64), G)
    u = u.reshape(a * a, weight.shape[1], weight.shape[0])
    if dtype == torch.bfloat16:
        return u.to(torch.bfloat16).unflatten(1, (-1, 2)).transpose(2, 3).contiguous()
    return u.to(torch.float32).contiguous()


def supports(conv: torch.nn.Conv2d, x: torch.Tensor, upsample: bool = False,
             pixels: "int | None" = None) -> bool:
    """This layer and input can run the kernel: fp32 CPU (or bf16 activations, of a bf16 or an fp32
    layer, on a CPU with AVX-512-BF16 and no AMX, 64k output channels), 3x3 stride 1 padding 1,
    channels in multiples of 8 (in) and 16 (out), and an output map big enough to be worth it (``upsample``:
    x is read nearest-upsampled 2x; ``pixels``: decide by this output size instead of x's, as a
    tile of a bigger map does)."""
    if pixels is None:
        pixels = x.shape[2] * x.shape[3] * (4 if upsample else 1) if x.dim() == 4 else 0
    if x.dtype == torch.bfloat16 and not (conv.out_channels % 64 == 0 and bf16_available()
                                          and isa.winograd_bf16()):
        return False
    # an fp32 layer computing in bf16 (the CPU executor's default on bf16 CPUs) runs here too
    w = conv.weight.dtype
    computes_in = x.dtype in (w, torch.bfloat16) and w in (x.dtype, torch.float32)
    return (x.dtype in (torch.float32, torch.bfloat16) and computes_in
            and x.device.type == "cpu" and x.dim() == 4
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.in_channels % 8 == 0 and conv.out_channels % 16 == 0
            and pixels >= MIN_PIXELS)


def conv3x3(x: torch.Tensor, U: torch.Tensor, bias: torch.Tensor | None, m: int,
            residual: torch.Tensor | None = None, relu: bool = False, upsample: bool = False) -> torch.Tensor:
    """act(conv3x3(x) + bias + residual) with transformed weights ``U`` (``transform_weight``).
    ``upsample``: convolve the nearest 2x upsampling of x without making it.
    x and residual are NCHW tensors; they are made channels_last-contiguous (a no-op in the fast
    executor); the result is channels_last, in x's dtype (fp32, or bf16 with a bf16 ``U``; sums in fp32)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the Winograd kernel is not available: {load_error()}")
    n, ci, h, w = x.shape
    if upsample:
        h, w = 2 * h, 2 * w
    bf16 = x.dtype == torch.bfloat16
    if bf16 != (U.dtype == torch.bfloat16):
        raise ValueError(f"activations {x.dtype} and transformed weight {U.dtype} differ")
    co = U.shape[2]
    if (U.shape != ((m + 2) ** 2, ci, co)) if not bf16 else (U.shape != ((m + 2) ** 2, ci // 2, co, 2)):
        raise ValueError(f"transformed weight {tuple(U.shape)} does not fit F({m}x{m},3x3) "
                         f"with {ci} input channels")
    x = x.contiguous(memory_format=torch.channels_last)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
        if residual.shape != (n, co, h, w) or residual.dtype != x.dtype:
            raise ValueError(f"residual {tuple(residual.shape)} does not match the output {(n, co, h, w)}")
    if bias is not None:
        bias = bias.detach().float().contiguous()
    y = torch.empty((n, co, h, w), dtype=x.dtype, memory_format=torch.channels_last)
    rc = lib.taesd_winograd_conv(
        x.data_ptr(), n, h, w, ci, U.data_ptr(), co, None if bias is None else bias.data_ptr(),
        None if residual is None else residual.data_ptr(), int(relu), y.data_ptr(), m,
        torch.get_num_threads(), int(upsample), int(bf16))
    if rc != 0:
        raise RuntimeError(f"the Winograd kernel refused the call (code {rc})")
    return y


if __name__ == "__main__":   # python -m taesd.runtime.winograd: build now, say where (set-up runs this)
    try:
        print(f"Winograd kernel: {build()}")
    except RuntimeError as e:
        print(f"Winograd kernel not built ({e}); the direct convolution will be used")
