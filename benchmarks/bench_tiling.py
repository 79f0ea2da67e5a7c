"""Tiled vs untiled decoding: peak memory, time, and exactness (ours vs diffusers' enable_tiling()).

Each configuration runs in a fresh subprocess, so peak RSS (ru_maxrss) is its own; memory is
reported above the RSS after loading the model and warming up. Fresh taesd weights (4 latent
channels) are copied into diffusers' AutoencoderTiny so both decode the same latents.

    PYTHONPATH=src python3 benchmarks/bench_tiling.py                 # 128, 256, 512 latents
    PYTHONPATH=src python3 benchmarks/bench_tiling.py --sizes 64 128  # quicker

Writes the table to benchmarks/TILING.md. Untiled (and diffusers) runs are skipped above
--untiled-max / --diffusers-max latent pixels, or when the untiled estimate exceeds free memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BUDGET = "1GiB"


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one(size: int, mode: str, out: Path) -> dict:
    """Decode 1 x 4 x size x size latents once in this process; report memory and time."""
    import psutil
    import torch

    import taesd
    model = taesd.create("taesd", seed=0)
    latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(1))
    if mode == "diffusers":
        from diffusers import AutoencoderTiny

        from taesd.io.weights.formats import save_weights, state_dicts
        with tempfile.TemporaryDirectory() as tmp:
            save_weights(state_dicts(model), "taesd", "diffusers", tmp)
            vae = AutoencoderTiny.from_pretrained(tmp).eval()
        vae.enable_tiling()
        del model

        def decode(z):
            with torch.inference_mode():
                return ((vae.decode(z).sample + 1) / 2).clamp(0, 1)
    else:
        kwargs = {"max_memory": BUDGET} if mode == "tiled" else {}

        def decode(z):
            return model.decode(z, **kwargs)
    decode(torch.randn(1, 4, 16, 16))   # warm-up: kernels and thread pools
    base = psutil.Process().memory_info().rss
    t0, c0 = time.perf_counter(), _cpu_seconds()
    image = decode(latents)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    np.save(out, image[0].float().numpy())
    return {"size": size, "mode": mode, "wall_s": wall, "cpu_s": cpu, "peak_above_model": peak - base}


def run_child(size: int, mode: str, out: Path, reuse: bool) -> dict:
    """One configuration in a fresh process; with ``reuse``, a result already in the work folder
    (from an interrupted run) is read instead of measured again."""
    record = out.with_suffix(".json")
    if reuse and record.is_file() and out.is_file():
        return json.loads(record.read_text())
    cmd = [sys.executable, __file__, "--one", str(size), mode, str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if res.returncode:
        raise SystemExit(f"{mode} {size}: {res.stderr.strip().splitlines()[-1:]}")
    result = json.loads(res.stdout.strip().splitlines()[-1])
    record.write_text(json.dumps(result))
    return result


def untiled_fits(size: int) -> bool:
    import psutil

    import taesd
    from taesd.tiling import Pass, analyse, estimate_peak, memory_overhead
    model = taesd.create("taesd", parts="decoder")
    an = analyse(model, "decoder")
    need = estimate_peak(an, Pass(1, size, size, 4, 3, memory_overhead(model, an)))
    return need * 1.3 < psutil.virtual_memory().available


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512], help="latent sizes")
    ap.add_argument("--untiled-max", type=int, default=256, help="largest latent size to decode untiled")
    ap.add_argument("--diffusers-max", type=int, default=512, help="largest latent size for diffusers")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (median reported)")
    ap.add_argument("--output", default=str(HERE / "TILING.md"))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "taesd_bench_tiling"),
                    help="folder for decoded images and per-run results")
    ap.add_argument("--reuse", action="store_true", help="reuse results already in --work (resume)")
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], Path(args.one[2]))))
        return

    import torch
    rows = []
    tmp = Path(args.work)
    tmp.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        modes = ["tiled"]
        if size <= args.untiled_max and untiled_fits(size):
            modes.insert(0, "untiled")
        if size <= args.diffusers_max:
            modes.append("diffusers")
        result, images = {}, {}
        for mode in modes:
            runs = [run_child(size, mode, tmp / f"{size}_{mode}.npy", args.reuse and not r)
                    for r in range(args.repeat)]
            result[mode] = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_s", "peak_above_model")}
            images[mode] = np.load(tmp / f"{size}_{mode}.npy")
            print(f"{size} {mode}: {result[mode]}", flush=True)
        # Reference: the untiled pass; where it did not run, our tiled one (exact where both ran).
        ref_mode = "untiled" if "untiled" in images else "tiled"
        ref = torch.from_numpy(images[ref_mode])
        for mode in modes:
            err = (torch.from_numpy(images[mode]) - ref).abs().max().item()
            rows.append((size, mode, result[mode], err, ref_mode))
        del images, ref
    lines = ["| latents | image | mode | peak RSS above model (GiB) | wall (s) | CPU (s) | max abs err vs reference |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for size, mode, r, err, ref_mode in rows:
        label = {"untiled": "untiled", "tiled": f"ours, --max-memory {BUDGET}", "diffusers": "diffusers enable_tiling()"}[mode]
        if mode == ref_mode:
            err_text = "reference" if mode == "untiled" else "reference (untiled skipped)"
        else:
            err_text = f"{err:.2e}" + ("" if ref_mode == "untiled" else " (vs ours tiled)")
        lines.append(f"| {size}² | {size * 8}² | {label} | {gib(r['peak_above_model'])} | {r['wall_s']:.1f} | "
                     f"{r['cpu_s']:.1f} | {err_text} |")
    table = "\n".join(lines)
    print(table)
    header = (f"# Tiled decoding benchmark\n\nFresh taesd weights, 1 x 4 x N x N latents, fp32, CPU "
              f"({torch.get_num_threads()} threads). Generated by `benchmarks/bench_tiling.py "
              f"{' '.join(sys.argv[1:])}`; each row is a fresh process, median of {args.repeat}.\n\n")
    Path(args.output).write_text(header + table + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
