"""Our 3x3 convolution on AMX tiles, for bf16 compute on Intel CPUs with AMX (Sapphire Rapids on).

oneDNN's bf16 convolutions run on the tile units too; ours (``_amx_conv.cpp``) is 1.2-1.7x faster
at TAESD's 64 channels (benchmarks/AMX.md), runs a whole residual block as one pass, and reads its
input nearest-upsampled 2x on the fly: the decoder's Upsample + conv without the 4x bigger map, the
same sums as the conv of the upsampled map (so, unlike the fp32 phase-kernel fusion, it keeps bf16
tiles exact), bias + residual + ReLU in the same pass; ``chain`` runs several such convs in one pass
(the maps between them kept as rings of rows in the cache). Per output pixel the sum order is fixed,
whatever the map, so a tile of a map gives the same bits as the map.
Built on first use (``taesd.runtime.native``); off with ``TAESD_AMX=0`` or where the CPU, the
compiler or Linux refuses.
"""
from __future__ import annotations

import ctypes
import dataclasses
import subprocess
import threading
from pathlib import Path

import torch

from taesd import settings
from taesd.runtime import isa, native

SOURCE = Path(__file__).with_name("_amx_conv.cpp")
MIN_PIXELS = 48 * 48   # below this the thread start-up outweighs the gain: oneDNN's direct conv

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lock = threading.Lock()


def library() -> ctypes.CDLL | None:
    """The loaded kernel (built on first use, the tile state granted); None, with ``load_error()``
    saying why, where it cannot run."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        try:
            if not isa.detect().amx:
                raise RuntimeError("this CPU has no AMX tile units")
            lib = ctypes.CDLL(str(native.build(SOURCE, "amx_conv", needs=("amx_tile", "amx_bf16"))))
            fn = lib.taesd_amx_conv3x3
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                           ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                           ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
            fn.restype = ctypes.c_int
            block = lib.taesd_amx_block
            block.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              *[ctypes.c_void_p] * 6, ctypes.c_void_p, ctypes.c_int]
            block.restype = ctypes.c_int
            chain = lib.taesd_amx_chain
            chain.argtypes = [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int] * 5, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
                              ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_int]
            chain.restype = ctypes.c_int
            pool = lib.taesd_amx_pool
            pool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int] * 4, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_double,
                             ctypes.c_int]
            pool.restype = ctypes.c_int
            if lib.taesd_amx_permit() != 0:
                raise RuntimeError("Linux did not grant the AMX tile state (arch_prctl)")
            _lib = lib
        except (RuntimeError, OSError, subprocess.SubprocessError, AttributeError) as e:
            _lib_error = str(e)
    return _lib


def _required() -> ctypes.CDLL:
    """The loaded kernel, or a one-line error saying why there is none."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the AMX kernel is not available: {load_error()}")
    return lib


def load_error() -> str | None:
    return _lib_error


def available() -> bool:
    return settings.amx() and library() is not None


def supports(conv: torch.nn.Conv2d, x: torch.Tensor, upsample: bool = False,
             pixels: "int | None" = None, shape: "tuple | None" = None) -> bool:
    """This layer and input can run the kernel: bf16 on the CPU, 3x3 stride 1 (or 2, without
    upsampling) padding 1, channels in multiples of 32, a map of at least ``MIN_PIXELS`` read
    (``pixels``: decide by this size, as a tile of a bigger map does; ``shape``: the layer reads a map
    of this shape, made from x later in a chain)."""
    shape = tuple(x.shape) if shape is None else tuple(shape)
    if pixels is None:
        pixels = shape[2] * shape[3] * (4 if upsample else 1) if len(shape) == 4 else 0
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and len(shape) == 4
            and shape[1] == conv.in_channels and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and (conv.stride == (1, 1) or (conv.stride == (2, 2) and not upsample))
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.in_channels % 32 == 0 and conv.out_channels % 32 == 0 and pixels >= MIN_PIXELS)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) -> the tile layout [O/32][9 taps][I/32][2][16 input-channel pairs][16][2] in
    bf16: for each tap and 32 input channels, two B tiles of 16 output channels, pairs of input
    channels side by side (what TDPBF16PS multiplies and adds in one step)."""
    o, i = weight.shape[:2]
    w = weight.detach().to("cpu", torch.bfloat16).reshape(o // 32, 2, 16, i // 32, 16, 2, 3, 3)
    return w.permute(0, 6, 7, 3, 1, 4, 2, 5).contiguous().reshape(-1)


PATCH = 32   # an im2col stage's patch: 3 x 3 x (at most 3) channels, padded to one tile's 32 values


def supports_im2col(conv: torch.nn.Conv2d, x: torch.Tensor, pixels: "int | None" = None) -> bool:
    """A network's first conv (3x3 stride 1 padding 1 from at most 3 channels, to a multiple of 32)
    can run the kernel as an im2col stage: each pixel's 27 inputs gathered into one tile row."""
    if pixels is None:
        pixels = x.shape[2] * x.shape[3] if x.dim() == 4 else 0
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 4
            and x.shape[1] == conv.in_channels and 9 * conv.in_channels <= PATCH
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.out_channels % 32 == 0 and pixels >= MIN_PIXELS)


def pack_im2col_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O, I <= 3, 3, 3) -> the im2col stage's tile layout: per 32 outputs two B tiles of one 32-value
    patch ((dy, dx, c) order, zero-padded), pairs side by side, in bf16."""
    o, i = weight.shape[:2]
    w = torch.zeros(o, PATCH, dtype=torch.float32)
    w[:, :9 * i] = weight.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).reshape(o, 9 * i)
    w = w.to(torch.bfloat16).reshape(o // 32, 2, 16, 16, 2)
    return w.permute(0, 1, 3, 2, 4).contiguous().reshape(-1)


NARROW = 16   # a narrow stage's outputs: one B tile of 16 channels


def supports_narrow(conv: torch.nn.Conv2d, x: torch.Tensor, pixels: "int | None" = None,
                    shape: "tuple | None" = None) -> bool:
    """A decoder's last conv (3x3 stride 1 padding 1, from a multiple of 32 channels to at most 16) can
    run the kernel as a narrow stage (``shape``: on a map of this shape made from x in a chain)."""
    shape = tuple(x.shape) if shape is None else tuple(shape)
    if pixels is None:
        pixels = shape[2] * shape[3] if len(shape) == 4 else 0
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and len(shape) == 4
            and shape[1] == conv.in_channels and conv.in_channels % 32 == 0
            and conv.out_channels <= NARROW and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and pixels >= MIN_PIXELS)


def pack_narrow_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O <= 16, I, 3, 3) -> the narrow stage's layout: per tap and 32 input channels one B tile of 16
    outputs (zero past O), pairs of input channels side by side, in bf16."""
    o, i = weight.shape[:2]
    w = torch.zeros(NARROW, i, 3, 3, dtype=torch.float32)
    w[:o] = weight.detach().to("cpu", torch.float32)
    w = w.to(torch.bfloat16).reshape(NARROW, i // 32, 16, 2, 3, 3)
    return w.permute(4, 5, 1, 2, 0, 3).contiguous().reshape(-1)


def conv3x3(x: torch.Tensor, packed: torch.Tensor, out_channels: int, bias: torch.Tensor | None,
            residual: torch.Tensor | None = None, relu: bool = False, upsample: bool = False,
            stride: int = 1) -> torch.Tensor:
    """act(conv3x3(x, stride) + bias + residual) in bf16 (sums in fp32), channels_last out; ``upsample``:
    convolve the nearest 2x upsampling of x without making it. ``packed``: ``pack_weight``."""
    lib = _required()
    n, ci, hv, wv = x.shape
    if upsample:
        hv, wv = 2 * hv, 2 * wv
    h, w = (hv - 1) // stride + 1, (wv - 1) // stride + 1
    if x.dtype != torch.bfloat16 or packed.numel() != out_channels * ci * 9:
        raise ValueError(f"packed weight of {packed.numel()} values does not fit {ci} -> {out_channels} "
                         "channels in bf16")
    x = x.contiguous(memory_format=torch.channels_last)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
        if residual.shape != (n, out_channels, h, w) or residual.dtype != x.dtype:
            raise ValueError(f"residual {tuple(residual.shape)} does not match the output "
                             f"{(n, out_channels, h, w)}")
    if bias is not None:
        bias = bias.detach().float().contiguous()
    y = torch.empty((n, out_channels, h, w), dtype=x.dtype, memory_format=torch.channels_last)
    rc = lib.taesd_amx_conv3x3(
        x.data_ptr(), n, hv, wv, ci, packed.data_ptr(), out_channels,
        None if bias is None else bias.data_ptr(), None if residual is None else residual.data_ptr(),
        int(relu), y.data_ptr(), torch.get_num_threads(), int(upsample), int(stride))
    if rc != 0:
        raise RuntimeError(f"the AMX kernel refused the call (code {rc})")
    return y


class Call:
    """One kernel call prepared for one input shape (``prepare_block``, ``prepare_chain``,
    ``prepare_pool``): the arguments checked and resolved once, so a call costs the allocation of its
    output and the kernel (the executor keeps these per layer: ~0.2 ms of Python per layer and call
    otherwise, measured on the 512² network). ``call(x)``: x of the shape it was prepared for."""

    def __init__(self, in_shape: tuple, out_shape: tuple, run, keep: tuple, what: str,
                 strided: bool = False):
        self.in_shape, self.out_shape, self.what = tuple(in_shape), tuple(out_shape), what
        self._run, self._keep = run, keep   # keep: the tensors whose pointers ``run`` holds
        self._strided = strided   # a chain: run takes both maps' strides and the output's window

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(self.out_shape, dtype=torch.bfloat16, memory_format=torch.channels_last)
        if self._strided:
            return self.into(x, y, 0)   # checks x itself
        if tuple(x.shape) != self.in_shape or x.dtype != torch.bfloat16:
            raise ValueError(f"{self.what} was prepared for bf16 {self.in_shape}, "
                             f"got {x.dtype} {tuple(x.shape)}")
        x = x.contiguous(memory_format=torch.channels_last)
        self._check(self._run(x.data_ptr(), y.data_ptr(), torch.get_num_threads()))
        return y

    def into(self, x: torch.Tensor, y: torch.Tensor, first: int) -> torch.Tensor:
        """A chain's output columns ``first`` .. ``first + y.shape[3] - 1`` written into y, a window of a
        wider channels_last map (or all of them into a fresh map); x may be a column strip of one. Both
        are used where they lie (their rows that map's rows apart), not copied."""
        if tuple(x.shape) != self.in_shape or x.dtype != torch.bfloat16 or y.dtype != torch.bfloat16 \
                or tuple(y.shape[:3]) != self.out_shape[:3] or not rows_apart(y) \
                or not 0 <= first <= first + y.shape[3] <= self.out_shape[3]:
            raise ValueError(f"{self.what} was prepared for bf16 {self.in_shape} -> {self.out_shape}, got "
                             f"{x.dtype} {tuple(x.shape)} -> columns {first}.. of {y.dtype} {tuple(y.shape)}")
        if not rows_apart(x):
            x = x.contiguous(memory_format=torch.channels_last)
        self._check(self._run(x.data_ptr(), y.data_ptr(), torch.get_num_threads(), *_apart(x), *_apart(y),
                              first, y.shape[3]))
        return y

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"the AMX kernel refused the {self.what} (code {rc})")


def rows_apart(x: torch.Tensor) -> bool:
    """x (N, C, H, W) is channels_last but for the gaps between its rows and images (a column strip of
    a wider channels_last map): each row's W x C values contiguous."""
    n, c, h, w = x.shape
    s = x.stride()
    return (c == 1 or s[1] == 1) and (w == 1 or s[3] == c) and (h == 1 or s[2] >= w * c) \
        and (n == 1 or s[0] >= h * s[2])


def _apart(x: torch.Tensor) -> tuple:
    """(elements between rows, between images) of a ``rows_apart`` map; 0 where there is one."""
    n, _, h, _ = x.shape
    return (x.stride(2) if h > 1 else 0, x.stride(0) if n > 1 else 0)


def _biases(biases) -> list:
    return [None if b is None else b.detach().float().contiguous() for b in biases]


def _ptr(t: "torch.Tensor | None"):
    return None if t is None else t.data_ptr()


def prepare_block(shape: tuple, packed: "list[torch.Tensor]", biases: "list[torch.Tensor | None]") -> Call:
    """``block`` for inputs of ``shape``, prepared once."""
    fn = _required().taesd_amx_block
    n, c, h, w = shape
    if any(p.numel() != c * c * 9 for p in packed):
        raise ValueError(f"packed weights do not fit a {c} -> {c} channel block in bf16")
    bs = _biases(biases)
    wp, bp = [p.data_ptr() for p in packed], [_ptr(b) for b in bs]
    run = lambda x, y, t: fn(x, n, h, w, c, wp[0], bp[0], wp[1], bp[1], wp[2], bp[2], y, t)   # noqa: E731
    return Call(shape, shape, run, (*packed, *bs), "block")


def block(x: torch.Tensor, packed: "list[torch.Tensor]", biases: "list[torch.Tensor | None]") -> torch.Tensor:
    """relu(conv2(relu(conv1(relu(conv0(x))))) + x) in one pass (TAESD's residual block, identity
    skip, C -> C channels): the two intermediate maps stay in the cache, each rounded to bf16 as the
    separate convolutions round them (the same bits). ``packed``: three ``pack_weight``."""
    if x.dtype != torch.bfloat16:
        raise ValueError("the block kernel takes bf16 input")
    return prepare_block(tuple(x.shape), packed, biases)(x)


@dataclasses.dataclass(frozen=True)
class ChainStage:
    """One 3x3 conv of ``chain``: ``packed`` (``pack_weight``) to ``out_channels``, its bias, stride,
    ReLU, and ``skip``: the index of the map added before the ReLU (map 0 is the chain's input, map k + 1
    stage k's output), or None."""
    packed: torch.Tensor
    out_channels: int
    bias: "torch.Tensor | None" = None
    stride: int = 1
    relu: bool = False
    skip: "int | None" = None
    im2col: bool = False   # the first stage only: ``packed`` is ``pack_im2col_weight``'s
    narrow: bool = False   # the last stage only, to at most 16 channels: ``pack_narrow_weight``'s


def prepare_chain(shape: tuple, stages: "list[ChainStage]", upsample: bool = False) -> Call:
    """``chain`` for inputs of ``shape``, prepared once (every stage checked, the pointers gathered)."""
    fn = _required().taesd_amx_chain
    n, c, h, w = shape
    if upsample:
        h, w = 2 * h, 2 * w
    if not 1 <= len(stages) <= MAX_STAGES:
        raise ValueError(f"a chain takes bf16 input and 1 to {MAX_STAGES} stages")
    channels, sizes = [c], [(h, w)]
    im2col = stages[0].im2col
    if any(s.im2col for s in stages[1:]) or (im2col and (upsample or 9 * c > PATCH)):
        raise ValueError(f"an im2col stage comes first, reads at most {PATCH // 9} channels, no upsampling")
    last = stages[-1]
    narrow = last.narrow
    if any(s.narrow for s in stages[:-1]) or (narrow and (last.out_channels > NARROW or last.relu
                                                           or last.skip is not None or last.stride != 1)):
        raise ValueError(f"a narrow stage comes last: to at most {NARROW} channels, stride 1, no ReLU "
                         "or skip")
    for k, s in enumerate(stages):
        if s.narrow:
            want = NARROW * channels[-1] * 9
        else:
            want = s.out_channels * (PATCH if s.im2col else channels[-1] * 9)
        if s.packed.numel() != want:
            raise ValueError(f"stage {k}: packed weight does not fit {channels[-1]} -> {s.out_channels}")
        channels.append(s.out_channels)
        sizes.append(((sizes[-1][0] - 1) // s.stride + 1, (sizes[-1][1] - 1) // s.stride + 1))
    biases = _biases(s.bias for s in stages)
    ints = lambda v: (ctypes.c_int * len(v))(*v)   # noqa: E731
    ptrs = lambda v: (ctypes.c_void_p * len(v))(*v)   # noqa: E731
    args = (n, h, w, int(upsample), len(stages), ints(channels), ptrs([s.packed.data_ptr() for s in stages]),
            ptrs([_ptr(b) for b in biases]), ints([s.stride for s in stages]),
            ints([int(s.relu) for s in stages]), ints([-1 if s.skip is None else s.skip for s in stages]),
            int(im2col), int(narrow))
    run = lambda x, y, t, *strides: fn(x, y, *args, t, *strides)   # noqa: E731
    return Call(shape, (n, channels[-1], *sizes[-1]), run, (*[s.packed for s in stages], *biases, args),
                f"chain of {len(stages)} convs", strided=True)


def chain(x: torch.Tensor, stages: "list[ChainStage]", upsample: bool = False) -> torch.Tensor:
    """The convs of ``stages`` one after another (the first reading x nearest-upsampled 2x with
    ``upsample``) in one pass: only x and the result touch memory, every map between stays in the
    cache as rings of rows. The same bits as the convs run one by one with ``conv3x3`` / ``block``."""
    if x.dtype != torch.bfloat16:
        raise ValueError(f"a chain takes bf16 input and 1 to {MAX_STAGES} stages")
    return prepare_chain(tuple(x.shape), stages, upsample)(x)


MAX_STAGES = 16


def supports_pool(pool: torch.nn.Sequential, x: torch.Tensor) -> bool:
    """``pool`` is FLUX.2's pool branch (1x1 conv C -> Hd without bias, GroupNorm, ReLU, 1x1 conv
    Hd -> C without bias) with C a multiple of 32 and Hd of 64, and x a bf16 CPU map of C channels."""
    if len(pool) != 4 or x.dim() != 4 or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return False
    up, norm, act, down = pool
    return isinstance(up, torch.nn.Conv2d) and isinstance(down, torch.nn.Conv2d) \
        and type(norm) is torch.nn.GroupNorm and type(act) is torch.nn.ReLU and all(
            c.kernel_size == (1, 1) and c.stride == (1, 1) and c.padding == (0, 0) and c.groups == 1
            and c.bias is None for c in (up, down)) \
        and up.in_channels == down.out_channels == x.shape[1] and x.shape[1] % 32 == 0 \
        and up.out_channels == down.in_channels == norm.num_channels and norm.num_channels % 64 == 0 \
        and norm.affine


def pack_1x1_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, 1, 1) -> B tiles [I/32][O/16][16 input-channel pairs][16][2] in bf16 (``pool``)."""
    o, i = weight.shape[:2]
    w = weight.detach().to("cpu", torch.bfloat16).reshape(o // 16, 16, i // 32, 16, 2)
    return w.permute(2, 0, 3, 1, 4).contiguous().reshape(-1)


def prepare_pool(shape: tuple, up: torch.Tensor, down: torch.Tensor, norm: torch.nn.GroupNorm) -> Call:
    """``pool`` for inputs of ``shape``, prepared once."""
    fn = _required().taesd_amx_pool
    n, c, h, w = shape
    hidden = norm.num_channels
    if up.numel() != c * hidden or down.numel() != c * hidden:
        raise ValueError(f"packed 1x1 weights do not fit {c} -> {hidden} -> {c} channels in bf16")
    gamma, beta = _biases((norm.weight, norm.bias))
    args = (n, h * w, c, hidden, up.data_ptr(), down.data_ptr(), gamma.data_ptr(), beta.data_ptr(),
            norm.num_groups, float(norm.eps))
    return Call(shape, shape, lambda x, y, t: fn(x, y, *args, t), (up, down, gamma, beta), "pool branch")


def pool(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """x + down(relu(norm(up(x)))) in bf16 (FLUX.2's pool branch; ``supports_pool``) in two passes over x:
    the GroupNorm's statistics from the fp32 sums of up(x), then the branch with the norm folded into a
    scale and shift per channel, rounded to bf16 once, before ``down``, and once at the end. ``up``,
    ``down``: ``pack_1x1_weight``. Per image the same bits whatever the thread count."""
    if x.dtype != torch.bfloat16:
        raise ValueError("the pool kernel takes bf16 input")
    return prepare_pool(tuple(x.shape), up, down, norm)(x)
