"""Our direct 3x3 convolution for layers with few output channels (the decoder's last conv to RGB).

oneDNN computes 16 output channels at a time, so a 64 -> 3 conv runs at a few % of the vector peak
(512² decode, 2 threads, AMD Zen 4: 26 ms in fp32, 14 ms in bf16, ~9% of the whole decode; ours:
10 ms and 4.4 ms).
``_narrow_conv.cpp`` computes each output pixel as a dot product over its 9 taps x input channels,
vectorised over the input channels (fp32 FMA, or bf16 pairs with AVX-512-BF16; fp32 sums), with a
fixed sum order per pixel (a tile of a map gives the same bits as the map). Built on first use
(``taesd.runtime.native``, the Winograd kernel's switch ``TAESD_WINOGRAD=0`` turns it off too: both
are "our fp32/bf16 vector kernels"); oneDNN's convolution where it cannot run.
"""
from __future__ import annotations

import ctypes
import subprocess
import threading
from pathlib import Path

import torch

from taesd import settings
from taesd.runtime import isa, native

SOURCE = Path(__file__).with_name("_narrow_conv.cpp")
MAX_OUT = 8             # up to this many output channels (more: oneDNN's blocked kernels do well)
MIN_PIXELS = 48 * 48    # below this the thread start-up outweighs the gain

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lock = threading.Lock()


def library() -> ctypes.CDLL | None:
    """The loaded kernel, built on first use; None (``load_error()`` says why) where it cannot be."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lock:
        if _lib is None and _lib_error is None:
            try:
                lib = ctypes.CDLL(str(build()))
                fn = lib.taesd_narrow_conv3x3
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                               ctypes.c_int]
                fn.restype = ctypes.c_int
                lib.taesd_narrow_has_bf16.restype = ctypes.c_int
                _lib = lib
            except (RuntimeError, OSError, subprocess.SubprocessError, AttributeError) as e:
                _lib_error = str(e)
    return _lib


def build() -> Path:
    """Compile the kernel into the cache (once); RuntimeError with the reason when it cannot."""
    return native.build(SOURCE, "narrow_conv", needs=("avx2", "fma"))


def load_error() -> str | None:
    return _lib_error


def available(dtype: torch.dtype = torch.float32) -> bool:
    """The kernel runs ``dtype`` activations here (bf16: a build with AVX-512-BF16)."""
    lib = library() if settings.winograd() else None
    if lib is None or dtype not in (torch.float32, torch.bfloat16):
        return False
    return dtype == torch.float32 or bool(lib.taesd_narrow_has_bf16())


def supports(conv: torch.nn.Conv2d, x: torch.Tensor, pixels: "int | None" = None) -> bool:
    """This layer and input can run the kernel: a 3x3 stride-1 padding-1 conv to at most ``MAX_OUT``
    channels from a multiple of 32, on a map of at least ``MIN_PIXELS`` (``pixels``: decide by this
    size, as a tile of a bigger map does), fp32 or bf16 activations of an fp32 or a same-dtype layer."""
    if pixels is None:
        pixels = x.shape[2] * x.shape[3] if x.dim() == 4 else 0
    # an fp32 layer computing in bf16 (the CPU executor's default on bf16 CPUs) runs here too
    w = conv.weight.dtype
    computes_in = x.dtype in (w, torch.bfloat16) and w in (x.dtype, torch.float32)
    if x.dtype == torch.bfloat16 and not isa.winograd_bf16():
        return False
    return (computes_in and x.device.type == "cpu" and x.dim() == 4
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.out_channels <= MAX_OUT and conv.in_channels % 32 == 0 and pixels >= MIN_PIXELS
            and available(x.dtype))


def pack_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(O, I, 3, 3) -> [O][3][3][I] in the activations' dtype (each tap's input channels contiguous,
    as the NHWC input is)."""
    return weight.detach().to("cpu", dtype).permute(0, 2, 3, 1).contiguous()


def conv3x3(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv3x3(x) + bias, channels_last out in x's dtype (fp32 sums). ``packed``: ``pack_weight``."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the narrow conv kernel is not available: {load_error()}")
    n, ci, h, w = x.shape
    co = packed.shape[0]
    if packed.dtype != x.dtype or packed.shape != (co, 3, 3, ci):
        raise ValueError(f"packed weight {tuple(packed.shape)} {packed.dtype} does not fit {ci} input "
                         f"channels in {x.dtype}")
    x = x.contiguous(memory_format=torch.channels_last)
    if bias is not None:
        bias = bias.detach().float().contiguous()
    y = torch.empty((n, co, h, w), dtype=x.dtype, memory_format=torch.channels_last)
    rc = lib.taesd_narrow_conv3x3(x.data_ptr(), n, h, w, ci, packed.data_ptr(), co,
                                  None if bias is None else bias.data_ptr(), y.data_ptr(),
                                  torch.get_num_threads(), int(x.dtype == torch.bfloat16))
    if rc != 0:
        raise RuntimeError(f"the narrow conv kernel refused the call (code {rc})")
    return y


if __name__ == "__main__":   # python -m taesd.runtime.narrow: build now, say where (set-up runs this)
    try:
        print(f"narrow conv kernel: {build()}")
    except RuntimeError as e:
        print(f"narrow conv kernel not built ({e}); oneDNN's convolution will be used")
