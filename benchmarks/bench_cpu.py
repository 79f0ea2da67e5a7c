"""The CPU table: taesd (fp32 default, bf16) against ONNX Runtime fp32 and OpenVINO (its default
precision, and f32), decode and encode, with each path's PSNR against fp32 PyTorch on the real taef2
weights. Writes benchmarks/CPU.md.

    OMP_NUM_THREADS=2 TAESD_WEIGHTS=/work/shared/weights python benchmarks/bench_cpu.py

Every competitor runs in its own process (benchmarks/speed.py workers), called in turns A B C A B C
after warm-up, so the ratios are same-run ratios even on a loaded machine. OpenVINO is a
benchmark-only install (``pip install openvino``); without it its rows are left out.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import speed  # noqa: E402

PATHS = ["taesd", "taesd-onednn", "taesd-fp32", "onnxruntime", "openvino", "openvino-f32"]
PRECISION = {"taesd-fp32": "fp32", "taesd-bf16": "bf16", "onnxruntime": "fp32", "openvino-f32": "f32"}
PHOTOS = ("astronaut", "coffee", "chelsea")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_cpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="+", choices=["decode", "encode"], default=["decode", "encode"])
    p.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    p.add_argument("--competitors", nargs="+", choices=list(speed.COMPETITORS), default=None,
                   help=f"default: {' '.join(PATHS)} (OpenVINO only where it is installed)")
    p.add_argument("--calls", type=int, default=3, help="timed calls per competitor")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--weights", default=os.environ.get("TAESD_WEIGHTS"), help="taef2 weights folder")
    p.add_argument("--accuracy-size", type=int, default=256, help="side of the photo crops for PSNR")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("-o", "--output", default=str(HERE / "CPU.md"))
    return p


# ---------------------------------------------------------------- accuracy (one process, taef2)

def _photos(size: int):
    import numpy as np
    import skimage.data
    import torch
    import torch.nn.functional as F
    out = []
    for name in PHOTOS:
        arr = np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
        side = min(x.shape[2:])
        x = x[:, :, :side, :side]   # the top-left square, scaled to size
        out.append(F.interpolate(x, size=(size, size), mode="area"))
    return torch.cat(out)


def _path_functions(name: str, weights: str, x, z):
    """(encode, decode) of path ``name`` on taef2, each taking and returning fp32 torch tensors."""
    import torch

    import taesd
    if name.startswith("taesd"):
        dtype = {"taesd-bf16": torch.bfloat16, "taesd-fp32": torch.float32}.get(name)   # taesd: the default
        model = taesd.load("taef2", weights, device="cpu", dtype=dtype)
        amx_switch = "0" if name == "taesd-onednn" else "1"

        def call(run):
            def f(t):
                with speed.environment(TAESD_AMX=amx_switch):
                    return run(t.to(model.dtype)).float()
            return f
        return call(model.encode), call(model.decode)
    plain = taesd.load("taef2", weights, device="cpu", executor="plain")
    enc = speed.onnx_runner(plain.encoder, x[:1, :, :64, :64], name)
    dec = speed.onnx_runner(plain.decoder, z[:1, :, :8, :8], name)
    return (lambda t: torch.from_numpy(enc(t.numpy()))), (lambda t: torch.from_numpy(dec(t.numpy())))


def accuracy(names: list[str], weights: str, size: int) -> dict[tuple[str, str], float]:
    """PSNR (dB, mean over the photos) against fp32 PyTorch (the plain eager network): decode of the
    same latents; encode: the fp32 decode of the path's latents against that of the fp32 latents."""
    import torch

    import taesd
    from taesd.evaluation.metrics import psnr
    plain = taesd.load("taef2", weights, device="cpu", executor="plain")
    x = _photos(size)
    with torch.inference_mode():
        z = plain.encode(x)
        ref = plain.decode(z)
    out = {}
    for name in names:
        encode, decode = _path_functions(name, weights, x, z)
        with torch.inference_mode():
            out[name, "decode"] = psnr(decode(z).clamp(0, 1), ref).mean().item()
            out[name, "encode"] = psnr(plain.decode(encode(x)), ref).mean().item()
    return out


# ---------------------------------------------------------------- the table

def table(rows, psnrs: dict) -> str:
    lines = ["| op | size | path | precision | median s (min-max) | x vs ONNX RT fp32 | x vs OpenVINO default "
             "| PSNR dB vs fp32 |", "|" + " --- |" * 8]
    groups = {}
    for r in rows:
        if r.name != speed.PEAK:
            groups.setdefault((r.op, r.size), []).append(r)
    for (op, size), group in groups.items():
        ref = {r.name: r.median for r in group}
        for r in group:
            vs = lambda other: f"{ref[other] / r.median:.2f}" if other in ref else "-"  # noqa: E731
            db = psnrs.get((r.name, op))
            lines.append(f"| {op} | {size}² | {r.name} | {PRECISION.get(r.name, '?')} "
                         f"| {r.median:.3f} ({min(r.times):.3f}-{max(r.times):.3f}) | {vs('onnxruntime')} "
                         f"| {vs('openvino')} | {'-' if db is None else f'{db:.1f}'} |")
    return "\n".join(lines)


def amx_default() -> bool:
    """The default path computes in bf16 with our AMX kernel here (then taesd-onednn is its A/B)."""
    import torch

    from taesd.runtime import amx
    return isa_default() == torch.bfloat16 and amx.available()


def isa_default():
    """What taesd's default computes in here (the CPU's rule and $TAESD_CPU_BF16)."""
    import taesd
    from taesd.runtime.executors import CpuExecutor
    return CpuExecutor().compute_dtype(taesd.create("taesd"))


def machine_lines() -> list[str]:
    from taesd.runtime import isa
    facts = speed.machine_facts()
    facts.insert(1, f"ISA tier (taesd.runtime.isa): {isa.detect().describe()}; an fp32 taesd model computes "
                    f"in {str(isa.default_dtype()).removeprefix('torch.')} here by default")
    return facts


def run(args) -> int:
    default_bf16 = str(isa_default()) == "torch.bfloat16"
    # The default's A/B: oneDNN's kernels instead of our AMX kernel (AMX CPUs), or direct convs
    # instead of our bf16 Winograd kernel (AVX-512-BF16 without AMX)
    ab = "taesd-onednn" if amx_default() else "taesd-direct" if default_bf16 else None
    names = args.competitors or [ab if n == "taesd-onednn" else n for n in PATHS
                                 if (not n.startswith("openvino") or importlib.util.find_spec("openvino"))
                                 and (n != "taesd-onednn" or ab)]
    PRECISION["taesd"] = "bf16 (default)" if default_bf16 else "fp32"
    PRECISION["taesd-onednn"] = PRECISION["taesd-direct"] = "bf16" if default_bf16 else "fp32"
    if any(n.startswith("openvino") for n in names):
        PRECISION["openvino"] = speed.openvino_precision("openvino")
        PRECISION["openvino-f32"] = speed.openvino_precision("openvino-f32")
    facts = machine_lines()
    print("\n".join(facts))
    started = time.time()
    rows = []
    for op in args.ops:
        for size in args.sizes:
            print(f"{op} {size}²: {' '.join(names)}", flush=True)
            rows += speed.run_config(op, size, 1, names, args.calls, args.warmup)
            for r in rows[-len(names) - 1:-1]:
                print(f"  {r.name}: {statistics.median(r.times):.3f} s", flush=True)
    psnrs = {} if args.no_accuracy or not args.weights else accuracy(names, args.weights, args.accuracy_size)
    text = table(rows, psnrs)
    print(text)
    notes = [f"{args.calls} timed calls per path after {args.warmup} warm-up, batch 1, paths in turns in "
             f"separate processes; threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
             "ONNX Runtime and OpenVINO at their defaults (all cores).",
             "Speed: the base TAESD with fresh weights. " + (
                 f"PSNR: taef2's published weights, photos {', '.join(PHOTOS)} ({args.accuracy_size}² "
                 "squares), against the plain fp32 PyTorch network; encode rows: the fp32 decode of that "
                 "path's latents." if psnrs else "PSNR: not measured (--no-accuracy, or no --weights / "
                 "$TAESD_WEIGHTS)."),
             f"whole run: {time.time() - started:.0f} s; load average at the end: "
             f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}"]
    capped = {k: os.environ[k] for k in ("TAESD_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    if capped:
        notes.append(f"CPU capped for taesd and PyTorch ({', '.join(f'{k}={v}' for k, v in capped.items())}): "
                     "the paths of an older CPU, run on this one; ONNX Runtime ran uncapped (the whole CPU).")
    report = "\n".join(["# TAESD on the CPU: taesd, ONNX Runtime, OpenVINO", "",
                        "Written by `benchmarks/bench_cpu.py`.", "", "## Machine", ""]
                       + [f"- {f}" for f in facts] + ["", "## Speed and accuracy", "", text, "", "## Notes", ""]
                       + [f"- {n}" for n in notes] + [""])
    Path(args.output).write_text(report)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run(build_parser().parse_args()))
