"""Our AMX kernel against the tile unit's peak and oneDNN: `python benchmarks/bench_amx.py [-o benchmarks/AMX.md]`.

The bf16 layers of a TAESD decode/encode at 64 channels (a lone 3x3 conv with ReLU, a residual block
of three, a nearest-2x upsample + conv; two layers in a row one by one and chained; taef2's block
with its pool branch), per map size and thread count: milliseconds per call (the
best of 12 after a warm-up), GMAC/s, the share of the tile unit's peak (measured here: back-to-back
TDPBF16PS on loaded tiles, times the threads), and oneDNN's bf16 kernels on the same layer (what
`TAESD_AMX=0` runs). Needs a CPU with AMX (Sapphire Rapids or later); elsewhere it says so and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import taesd  # noqa: E402
from speed import machine_facts  # noqa: E402
from taesd.runtime import amx  # noqa: E402
from taesd.runtime.executors import CpuExecutor  # noqa: E402
from taesd.runtime.executors.cpu import (  # noqa: E402
    AmxChain,
    FastBlock,
    UpsampleConv,
    conv_relu,
    tune_allocator,
    upsample_conv,
)

C = 64


def best_ms(fn, trials: int = 12) -> float:
    fn()
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def peak_gmacs() -> float:
    """One core's bf16 tile rate, GMAC/s (16 x 16 x 32 multiply-adds per TDPBF16PS)."""
    fn = amx.library().taesd_amx_peak
    fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_long]
    steps = 2_000_000
    seconds = min(fn(steps) for _ in range(3))
    return steps * 4 * 16 * 16 * 32 / seconds / 1e9


def layers():
    """TAESD's own 64-channel layers as the CPU executor runs them (fresh weights): a residual block
    (FastBlock), its first conv, the conv that follows an Upsample, and the encoder's stride-2 conv."""
    model = CpuExecutor().apply(taesd.create("taesd", seed=0))
    block = next(m for m in model.decoder if isinstance(m, FastBlock))
    up = next(model.decoder[i + 1] for i, m in enumerate(model.decoder) if isinstance(m, nn.Upsample))
    down = next(m for m in model.encoder if isinstance(m, nn.Conv2d) and m.stride == (2, 2))
    return block, block.conv[0], up, down


@contextlib.contextmanager
def amx_off():
    """The executor's own layers as ``TAESD_AMX=0`` runs them: oneDNN's bf16 kernels."""
    old = os.environ.get("TAESD_AMX")
    os.environ["TAESD_AMX"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TAESD_AMX")
        else:
            os.environ["TAESD_AMX"] = old


def cases(size: int):
    """(name, multiply-adds, the layer's call) at output size ``size``: the same call runs our kernel,
    and oneDNN's under ``amx_off``."""
    x = torch.randn(1, C, size, size).bfloat16().contiguous(memory_format=torch.channels_last)
    small = torch.randn(1, C, size // 2, size // 2).bfloat16().contiguous(memory_format=torch.channels_last)
    block, conv, up, down = layers()
    conv_macs = size * size * C * C * 9
    yield "conv+ReLU", conv_macs, lambda: conv_relu(conv, x)
    yield "block (3 convs)", 3 * conv_macs, lambda: block(x)
    yield "upsample+conv", conv_macs, lambda: upsample_conv(up, small)
    # Two layers in a row: one by one on our kernel, then as one chain (the executor's AmxChain)
    yield "upsample+conv, block: one by one", 4 * conv_macs, lambda: block(upsample_conv(up, small))
    yield "upsample+conv, block: chained", 4 * conv_macs, lambda: AmxChain([UpsampleConv(up), block])(small)
    yield "block, stride-2 conv: one by one", 3.25 * conv_macs, lambda: down(block(x))
    yield "block, stride-2 conv: chained", 3.25 * conv_macs, lambda: AmxChain([block, down])(x)
    # taef2's pool block: x + pool(x) (1x1 conv to 256, GroupNorm, ReLU, 1x1 conv back), then the block
    pool_block = next(m for m in CpuExecutor().apply(taesd.create("taef2", seed=0)).decoder
                      if isinstance(m, FastBlock) and m.pool is not None)
    yield "pool block (taef2: pool branch + 3 convs)", 3 * conv_macs + size * size * C * 4 * C * 2, \
        lambda: pool_block(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_amx.py", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    p.add_argument("-o", "--output", default=str(HERE / "AMX.md"))
    args = p.parse_args(argv)
    if not amx.available():
        print(f"bench_amx.py: no AMX kernel here ({amx.load_error() or 'TAESD_AMX=0'}); it needs an Intel "
              "CPU with AMX (Sapphire Rapids or later)", file=sys.stderr)
        return 2
    tune_allocator()
    peak = peak_gmacs()
    head = ("| layer (64 ch, bf16) | output | threads | ours ms | GMAC/s | % of tile peak | oneDNN ms "
            "| x oneDNN |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    print(head)
    with torch.no_grad():
        for threads in dict.fromkeys(args.threads):
            torch.set_num_threads(threads)
            for size in args.sizes:
                for name, macs, call in cases(size):
                    a = best_ms(call)
                    with amx_off():
                        b = best_ms(call)
                    rate = macs / a / 1e6
                    row = (f"| {name} | {size}² | {threads} | {a:.2f} | {rate:.0f} | {100 * rate / (peak * threads):.0f}% "
                           f"| {b:.2f} | {b / a:.2f} |")
                    rows.append(row)
                    print(row, flush=True)
    text = "\n".join([
        "# Our AMX kernel against the tile unit's peak and oneDNN", "",
        "Written by `benchmarks/bench_amx.py`.", "",
        *[f"- {fact}" for fact in machine_facts()],
        f"- Tile peak measured here: {peak:.0f} GMAC/s per core (back-to-back TDPBF16PS on loaded tiles); "
        "\"% of tile peak\" is against that times the threads.",
        "- Best of 12 calls after a warm-up; TAESD's layers with fresh weights as the CPU executor runs "
        "them, random bf16 maps, batch 1. oneDNN: the same calls with TAESD_AMX=0 (its bf16 convolutions "
        "with the fused ReLU / add+ReLU post-ops; a block: three calls; upsample: F.interpolate, then "
        "the conv; chained rows: the two layers one after the other; the pool block: PyTorch's bf16 "
        "layers for its pool branch).", "", head, *rows, ""])
    Path(args.output).write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
