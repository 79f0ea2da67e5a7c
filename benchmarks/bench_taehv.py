#!/usr/bin/env python3
"""TAEHV on the CPU: decode speed against the published taehv.py, and bounded mode's peak memory.

    # speed: published decode_video (eager, parallel, fp32) vs taesd (fast executor, whole clip) in
    # fp32 and in its default precision (bf16 on AMX CPUs), same process, same weights, alternated
    python benchmarks/bench_taehv.py speed /tmp/taehv_ref/taehv.py --variant taew2_1 --size 40 --latents 3
    # memory: peak RSS of a bounded decode (one latent per step, frames dropped as made) per clip length
    python benchmarks/bench_taehv.py memory --variant taew2_1 --height 240 --width 416 --frames 17 81

The published code is imported from the path given (it is not part of this repository).
Random weights: speed and memory do not depend on their values.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch

from taesd.video import TAEHV, make_fast


def _published(path: str):
    spec = importlib.util.spec_from_file_location("taehv_published", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _psnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    """PSNR against the reference's own range (random weights decode to a narrow range of values)."""
    mse = (ref - x).double().pow(2).mean().item()
    span = (ref.max() - ref.min()).item()
    return float("inf") if mse == 0 else 10 * math.log10(span ** 2 / mse)


def _psnr_cell(ref: torch.Tensor, x: torch.Tensor) -> str:
    """The table's PSNR cell; identical outputs (the default is fp32 on this CPU) say so."""
    db = _psnr(ref, x)
    return "identical" if db == float("inf") else f"{db:.1f} dB"


@torch.no_grad()
def speed(args) -> None:
    ref_module = _published(args.taehv_py)
    torch.manual_seed(0)
    ours = TAEHV(args.variant, parts="decoder").eval()
    v = ours.variant
    ref = ref_module.TAEHV(checkpoint_path=None, patch_size=v.patch_size, latent_channels=v.latent_channels,
                           encoder_time_downscale=v.encoder_time_downscale,
                           decoder_time_upscale=v.decoder_time_upscale,
                           arch_variant="super" if v.decoder_block == "super" else None).eval()
    ref.decoder.load_state_dict(ours.decoder.state_dict())
    default = TAEHV(args.variant, parts="decoder").eval()
    default.load_state_dict(ours.state_dict())
    make_fast(ours, bf16=False)      # fp32, as the published code computes
    make_fast(default)               # what taesd.video.load gives: bf16 on AMX CPUs, else fp32
    latents = torch.randn(1, args.latents, v.latent_channels, args.size, args.size)
    runs = {"published": lambda: ref.decode_video(latents, parallel=True, show_progress_bar=False),
            "fp32": lambda: ours.decode(latents), "default": lambda: default.decode(latents)}
    times = {k: [] for k in runs}
    out = {}
    for _ in range(args.repeats):     # alternated: all see the same machine load
        for k, fn in runs.items():
            t = time.perf_counter()
            out[k] = fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(t) for k, t in times.items()}
    pub = med["published"]
    print(f"| {v.name} | {args.latents}x{args.size}x{args.size} -> {tuple(out['fp32'].shape[1:])} | {pub:.2f} s | "
          f"{med['fp32']:.2f} s | {pub / med['fp32']:.2f}x | {(out['published'] - out['fp32']).abs().max().item():.1e} | "
          f"{str(default.compute_dtype).replace('torch.', '')} | {med['default']:.2f} s | {pub / med['default']:.2f}x | "
          f"{_psnr_cell(out['fp32'], out['default'])} |", flush=True)


@torch.no_grad()
def _measure_one(variant: str, height: int, width: int, frames: int, mode: str, tile: int = 0) -> dict:
    model = make_fast(TAEHV(variant, parts="decoder").eval(), bf16=False)   # fp32: as documented
    v = model.variant
    n_latents = (frames - 1) // v.time_upscale + 1
    latents = torch.randn(1, n_latents, v.latent_channels, height // v.downscale, width // v.downscale)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t, made = time.perf_counter(), 0
    for piece in model.decode_chunks(latents, chunk=1 if mode == "bounded" else None, tile_size=tile or None):
        made += piece.shape[1]     # a writer would take the frames here; they are dropped
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"frames": made, "mode": mode, "tile": tile or "-", "peak_mib": peak / 1024, "growth_mib": (peak - base) / 1024,
            "seconds": time.perf_counter() - t}


def memory(args) -> None:
    print("| frames | mode | tile | peak RSS | growth over start | time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for frames in args.frames:
        for mode in args.modes:
            for tile in args.tile_sizes:
                cmd = [sys.executable, __file__, "_one", args.variant, str(args.height), str(args.width),
                       str(frames), mode, str(tile)]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                print(f"| {r['frames']} | {mode} | {r['tile']} | {r['peak_mib']:.0f} MiB | "
                      f"{r['growth_mib']:.0f} MiB | {r['seconds']:.1f} s |", flush=True)


SPEED_HEADER = ("| variant | latents -> frames | published fp32 | taesd fp32 | x published | max abs diff | "
                "taesd default computes in | taesd default | x published | PSNR default vs fp32 |\n"
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        variant, h, w, frames, mode, tile = sys.argv[2:8]
        print(json.dumps(_measure_one(variant, int(h), int(w), int(frames), mode, int(tile))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("taehv_py")
    s.add_argument("--variant", default="taew2_1")
    s.add_argument("--size", type=int, default=40, help="latent height = width")
    s.add_argument("--latents", type=int, default=3)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--no-header", action="store_true", help="print the table row only (to join runs)")
    m = sub.add_parser("memory")
    m.add_argument("--variant", default="taew2_1")
    m.add_argument("--height", type=int, default=480)
    m.add_argument("--width", type=int, default=832)
    m.add_argument("--frames", type=int, nargs="+", default=[17, 81])
    m.add_argument("--modes", nargs="+", default=["bounded"])
    m.add_argument("--tile-sizes", type=int, nargs="+", default=[0],
                   help="spatial tiles in latent pixels, 0: untiled (seam-exact either way)")
    args = parser.parse_args()
    if args.what == "speed":
        if not args.no_header:
            print(SPEED_HEADER)
        speed(args)
    else:
        memory(args)


if __name__ == "__main__":
    main()
