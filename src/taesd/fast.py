"""The fast executor: the same network, the same modules and weights, run close to the hardware.

``make_fast(model)`` transforms a ``TAESD`` in place; ``taesd.load`` applies it by default. What it
does, each measured (docs/performance.md):

- allocator: eager PyTorch on glibc gets a fresh ``mmap`` for every activation over 32 MiB (one
  64-channel 512x512 fp32 map is 64 MiB), page-faulted and zeroed on first touch, then unmapped
  again: ~100k-370k page faults per decode. ``tune_allocator`` raises glibc's mmap and trim
  thresholds (``mallopt``) so freed activations stay in the heap and are reused. It is a process
  setting; ``TAESD_MALLOPT=0`` in the environment switches it off.
- layout: weights in channels_last, so every convolution runs in oneDNN's native NHWC layout
  instead of reordering NCHW data in and out of each layer.
- fusion: inside each residual ``Block`` the conv+bias+ReLU pairs and the last conv + skip add +
  ReLU run as single oneDNN kernels (``mkldnn._convolution_pointwise``): three fewer passes over
  memory per block. Blocks keep their class layout (``conv``/``skip``/``fuse``/``pool``), so
  ``state_dict`` keys, Sequential indices and layer slices (tiling) are unchanged.

Everything stays exact in fp32 (the same oneDNN convolutions; sums in the same order). Where the
fused kernels do not apply (a GPU, autograd, a dtype this CPU has no fused kernel for) a block runs
its plain forward.
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch
import torch.nn as nn

from .model import TAESD, Block

ALLOCATOR_ENV = "TAESD_MALLOPT"
# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 1 << 30      # blocks below 1 GiB come from the heap, not a fresh mmap
TRIM_THRESHOLD = 1 << 30      # keep up to 1 GiB of freed heap instead of returning it at once
TOP_PAD = 64 << 20            # grow the heap in 64 MiB steps

_allocator_tuned: bool | None = None


def tune_allocator() -> bool:
    """Make glibc reuse freed activations instead of mmap/munmap-ing each one (once per process).
    Returns whether the setting is active. Off with ``TAESD_MALLOPT=0``; a no-op off glibc."""
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if os.environ.get(ALLOCATOR_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _allocator_tuned = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    return _allocator_tuned


# ---------------------------------------------------------------- fused oneDNN convolutions

_fused_ok: dict[torch.dtype, bool] = {}   # per dtype: does this CPU run the fused kernels?


def _conv_args(conv: nn.Conv2d) -> tuple:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


class FastConv2d(nn.Conv2d):
    """A ``Conv2d`` run by oneDNN with its weight packed once into oneDNN's blocked layout (plain
    convolutions reorder the weight on every call: ~35 reorders per decode). Same state_dict; the
    pack is redone when the weight changes (load_state_dict, .to(dtype))."""

    def packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype)
        if self.__dict__.get("_pack_key") != key:
            with torch.no_grad():
                self.__dict__["_packed"] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    w.detach().contiguous().to_mkldnn(), *_conv_args(self), list(x.shape))
            self.__dict__["_pack_key"] = key
        return self.__dict__["_packed"]

    def __getstate__(self):  # copies and pickles carry no packed (oneDNN-only) tensor
        state = super().__getstate__()
        state.pop("_packed", None)
        state.pop("_pack_key", None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused_available(x, self):
            return super().forward(x)
        return torch.ops.mkldnn._convolution_pointwise(
            x.contiguous(memory_format=torch.channels_last), self.packed_weight(x), self.bias,
            *_conv_args(self), "none", [], None)


def conv_relu(conv: FastConv2d, x: torch.Tensor) -> torch.Tensor:
    """relu(conv(x)) in one oneDNN kernel."""
    return torch.ops.mkldnn._convolution_pointwise(x, conv.packed_weight(x), conv.bias, *_conv_args(conv),
                                                   "relu", [], None)


def conv_add_relu(conv: FastConv2d, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """relu(conv(x) + other) in one oneDNN kernel (the residual block's end); ``other`` is only read."""
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, other, conv.packed_weight(x), conv.bias, *_conv_args(conv), "add", None, "relu", [], None)


def fused_available(x: torch.Tensor, module: nn.Module | None = None) -> bool:
    """The fused kernels apply: CPU, no autograd through ``x`` or ``module``'s parameters, fp32
    (or bf16/fp16 where this CPU has them)."""
    if x.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (
            module is not None and any(p.requires_grad for p in module.parameters()))):
        return False
    ok = _fused_ok.get(x.dtype)
    if ok is None:
        ok = _fused_ok[x.dtype] = _probe_fused(x.dtype)
    return ok


def _probe_fused(dtype: torch.dtype) -> bool:
    """Run both fused kernels once on a tiny input; some need CPU features (bf16: AVX-512 or
    AVX-NE-CONVERT)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    conv = nn.Conv2d(8, 8, 3, padding=1).to(dtype=dtype, memory_format=torch.channels_last)
    conv.__class__ = FastConv2d
    x = torch.ones(1, 8, 4, 4, dtype=dtype).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            conv_add_relu(conv, conv_relu(conv, x), x)
        return True
    except RuntimeError:
        return False


class FastBlock(Block):
    """A ``Block`` whose forward runs fused oneDNN kernels; same submodules, same state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused_available(x, self):
            return super().forward(x)
        x = x.contiguous(memory_format=torch.channels_last)
        if self.pool is not None:
            x = x + self.pool(x)
        body = self.conv
        h = conv_relu(body[2], conv_relu(body[0], x))
        return conv_add_relu(body[4], h, self.skip(x))


# ---------------------------------------------------------------- transforming a model

def make_fast(model: TAESD, allocator: bool = True) -> TAESD:
    """Transform ``model`` in place for fast inference and return it (see the module docstring).
    Exact in fp32. ``allocator=False`` leaves the process allocator alone."""
    if allocator and model.device.type == "cpu":
        tune_allocator()
    for part in model.parts:
        module = getattr(model, part)
        module.to(memory_format=torch.channels_last)
        for sub in module.modules():   # same attributes, new forward
            if type(sub) is Block:
                sub.__class__ = FastBlock
            elif type(sub) is nn.Conv2d:
                sub.__class__ = FastConv2d
    model.fast = True
    return model


def make_plain(model: TAESD) -> TAESD:
    """Undo ``make_fast`` (the allocator setting stays): plain modules, contiguous weights."""
    for part in model.parts:
        module = getattr(model, part)
        _unfuse(module)
        module.to(memory_format=torch.contiguous_format)
    model.fast = False
    return model


def _unfuse(module: nn.Module) -> None:
    for sub in module.modules():
        if type(sub) is FastBlock:
            sub.__class__ = Block
        elif type(sub) is FastConv2d:
            sub.__dict__.pop("_packed", None)
            sub.__dict__.pop("_pack_key", None)
            sub.__class__ = nn.Conv2d


def is_fast(model: TAESD) -> bool:
    return bool(getattr(model, "fast", False))


def compile_model(model: TAESD) -> TAESD:
    """Opt-in compiled mode: ``torch.compile`` each part in place (the modules keep their class,
    indices and state_dict). The first call per input shape compiles (tens of seconds on a CPU)."""
    for part in model.parts:
        module = getattr(model, part)
        _unfuse(module)   # inductor fuses by itself; give it the plain graph
        module.to(memory_format=torch.channels_last)
        module.compile(dynamic=False)
    model.fast = True
    return model
