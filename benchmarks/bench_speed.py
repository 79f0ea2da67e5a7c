"""The speed benchmark: `python benchmarks/bench_speed.py [options]` (also `taesd bench` in a checkout).

Every competitor (taesd's default and bf16 modes, the plain published network, diffusers
AutoencoderTiny, ONNX Runtime, the full SD VAE) runs in its own process, called in turns; writes
benchmarks/RESULTS.md. See docs/performance.md. The harness (speed.py) lives here, outside the
library: the package never imports it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import speed  # noqa: E402
from speed import COMPETITORS  # noqa: E402
from taesd.errors import TaesdError  # noqa: E402

DEFAULT_COMPETITORS = ["taesd", "taesd-direct", "taesd-bf16", "plain", "diffusers", "onnxruntime", "sd-vae"]


def default_competitors() -> list[str]:
    """All but the compiled mode; bf16 only where this CPU has the fused bf16 kernels (AVX-512 or
    AVX-NE-CONVERT): elsewhere bf16 runs emulated, several times slower than fp32."""
    import torch

    from taesd.runtime.executors.cpu import fused_available
    bf16_fast = fused_available(torch.zeros(1, dtype=torch.bfloat16))
    return [n for n in DEFAULT_COMPETITORS if n != "taesd-bf16" or bf16_fast]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_speed.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python benchmarks/bench_speed.py --sizes 512 --batches 1 --calls 5 -o RESULTS.md",
        description="Speed benchmark against diffusers, ONNX Runtime and the full SD VAE. Each competitor runs in its own process, called in turns after warm-up; prints a "
                       "table of median (min-max) times, images/s, speed-ups, GFLOP/s against the measured "
                       "conv peak and peak memory, and writes it with the machine's facts as markdown. "
                       "Competitors: " + "; ".join(f"{k}: {v}" for k, v in COMPETITORS.items()))
    p.add_argument("--ops", nargs="+", choices=["decode", "encode"], default=["decode", "encode"])
    p.add_argument("--sizes", nargs="+", type=int, default=[512, 1024], help="image sides in pixels")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--batch-max-size", type=int, default=512,
                   help="run batches > 1 only up to this size (time budget)")
    p.add_argument("--competitors", nargs="+", choices=list(COMPETITORS),
                   help="default: all but taesd-compile; taesd-bf16 only on CPUs with fast bf16")
    p.add_argument("--calls", type=int, default=5, help="timed calls per competitor (>= 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    p.add_argument("--sd-vae-max-size", type=int, default=512, help="the full VAE only up to this size, batch 1")
    p.add_argument("--sd-vae-calls", type=int, default=3, help="timed calls for the (slow) full VAE")
    p.add_argument("--weights", default=os.environ.get("TAESD_WEIGHTS"),
                   help="folder with taef2 weights for the accuracy table (default: $TAESD_WEIGHTS)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy table")
    p.add_argument("-o", "--output", default=str(HERE / "RESULTS.md"), help="markdown report to write")
    return p


def configs(args):
    for op in args.ops:
        for size in args.sizes:
            for batch in args.batches:
                if batch == 1 or size <= args.batch_max_size:
                    names = [n for n in args.competitors
                             if n != "sd-vae" or (batch == 1 and size <= args.sd_vae_max_size)]
                    yield op, size, batch, names


def run(args) -> int:
    if args.calls < 3:
        raise TaesdError("--calls must be at least 3 for a median and a spread")
    if args.competitors is None:
        args.competitors = default_competitors()
    plan = list(configs(args))
    total = sum(args.calls * (len(names) + 1) for *_, names in plan)
    facts = speed.machine_facts()
    started = time.time()
    rows = []
    with tqdm(total=total, desc="bench", unit="call", dynamic_ncols=True) as bar:
        for op, size, batch, names in plan:
            bar.set_postfix_str(f"{op} {size}² x{batch}")
            rows += speed.run_config(op, size, batch, names, args.calls, args.warmup, bar.update,
                                     {"sd-vae": min(args.sd_vae_calls, args.calls)})
    table = speed.table(rows)
    print(table)
    accuracy = ["(skipped)"]
    if not args.no_accuracy:
        if not args.weights:
            raise TaesdError("the accuracy table needs taef2 weights: set $TAESD_WEIGHTS or --weights (or --no-accuracy)")
        accuracy = speed.accuracy_lines(args.weights)
        print("\n".join(accuracy))
    notes = [f"{args.calls} timed calls per competitor after {args.warmup} warm-up call(s); the full SD VAE "
             f"{min(args.sd_vae_calls, args.calls)} calls, batch 1, sizes <= {args.sd_vae_max_size} only (it is "
             f"~20x slower); batches > 1 only up to {args.batch_max_size}².",
             f"whole run: {time.time() - started:.0f} s; load average at the end: "
             f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}"]
    speed.write_report(args.output, rows, facts, accuracy, notes)
    print(f"wrote {args.output}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--device=cuda" in argv or " ".join(argv).find("--device cuda") >= 0:
        import bench_gpu  # `taesd bench --device cuda`: the GPU table (benchmarks/bench_gpu.py)
        return bench_gpu.main(argv)
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except TaesdError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
