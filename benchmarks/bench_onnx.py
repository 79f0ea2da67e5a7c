"""Same-run timing of the PyTorch path against ONNX Runtime on our export (CPU).

    PYTHONPATH=src TAESD_WEIGHTS=/work/shared/weights python3 benchmarks/bench_onnx.py
    python3 benchmarks/bench_onnx.py --variant taesd --fresh --size 512 --repeats 5

Times ``model.encode`` / ``model.decode`` (what the library and CLI run) on one 512x512 image,
after one warm-up call, and reports the median of ``--repeats`` calls. Both backends are loaded
and measured in the same process, calls alternating between them, so they share the machine's state.
Prints a table and writes it to benchmarks/ONNX.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import onnxruntime
import torch

import taesd

OUT = Path(__file__).with_name("ONNX.md")


def time_interleaved(fns: dict, x, repeats: int) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per function; calls alternate so that both backends see the same
    machine load (other work on a shared machine shifts both, not one)."""
    for fn in fns.values():
        fn(x)  # warm-up: first-call allocations and kernel selection are not what we measure
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def open_models(args) -> dict[str, taesd.TAESD]:
    """Our PyTorch path (``taesd.load``'s model) and ORT sessions on our export of the same weights."""
    from taesd.export.onnx import to_onnx
    from taesd.runtime.executors.onnxruntime import OnnxPart, OnnxTAESD, providers_for
    # --fresh: for variants without local weights (fresh weights time the same)
    torch_model = taesd.create(args.variant, seed=0) if args.fresh else taesd.load(args.variant, device="cpu")
    sessions = {p: OnnxPart(to_onnx(torch_model, p), providers_for("cpu"), threads=args.threads)
                for p in torch_model.parts}
    return {"torch": torch_model, "onnxruntime": OnnxTAESD(args.variant, sessions)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="taef2")
    ap.add_argument("--fresh", action="store_true", help="fresh weights instead of the published ones")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for both backends (default: each library's own default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    models = open_models(args)
    v = models["torch"].variant
    image = torch.rand(1, v.image_channels, args.size, args.size, generator=torch.Generator().manual_seed(0))
    latents = models["torch"].encode(image)
    rows = []
    for part, x in (("decode", latents), ("encode", image)):
        results = time_interleaved({b: getattr(m, part) for b, m in models.items()}, x, args.repeats)
        base = results["torch"][0]
        for backend, (med, best) in results.items():
            rows.append((part, backend, f"{med * 1000:.0f}", f"{best * 1000:.0f}", f"{base / med:.2f}x"))

    header = ("part", "backend", "median ms", "min ms", "vs torch")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    table = "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])
    setup = (f"{v.name} ({'fresh' if args.fresh else 'published'} weights), one {args.size}x{args.size} image, "
             f"fp32, CPU ({platform.processor() or platform.machine()}), median of {args.repeats} after 1 warm-up, backends alternating; "
             f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
             f"{onnxruntime.__version__} ({args.threads or 'default'} threads); {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(setup)
    print(table)
    OUT.write_text("# ONNX Runtime vs PyTorch (same run)\n\n"
                   "Written by `benchmarks/bench_onnx.py`; rerun it to refresh.\n\n"
                   f"{setup}\n\n{table}\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
