#!/usr/bin/env python3
"""TAEHV on the CPU: decode speed against the published taehv.py, and bounded mode's peak memory.

    # speed: published decode_video (eager, parallel) vs taesd (fast executor, whole clip),
    # same process, same weights, alternated
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
    make_fast(ours)
    latents = torch.randn(1, args.latents, v.latent_channels, args.size, args.size)
    times = {"published": [], "taesd": []}
    for _ in range(args.repeats):     # alternated: both see the same machine load
        t = time.perf_counter()
        a = ref.decode_video(latents, parallel=True, show_progress_bar=False)
        times["published"].append(time.perf_counter() - t)
        t = time.perf_counter()
        b = ours.decode(latents)
        times["taesd"].append(time.perf_counter() - t)
    pub, mine = statistics.median(times["published"]), statistics.median(times["taesd"])
    print(f"| {v.name} | {args.latents}x{args.size}x{args.size} -> {tuple(b.shape[1:])} | {pub:.2f} s | "
          f"{mine:.2f} s | {pub / mine:.2f}x | {(a - b).abs().max().item():.1e} |")


@torch.no_grad()
def _measure_one(variant: str, height: int, width: int, frames: int, mode: str, tile: int = 0) -> dict:
    model = make_fast(TAEHV(variant, parts="decoder").eval())
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
    m = sub.add_parser("memory")
    m.add_argument("--variant", default="taew2_1")
    m.add_argument("--height", type=int, default=480)
    m.add_argument("--width", type=int, default=832)
    m.add_argument("--frames", type=int, nargs="+", default=[17, 81])
    m.add_argument("--modes", nargs="+", default=["bounded"])
    m.add_argument("--tile-sizes", type=int, nargs="+", default=[0],
                   help="spatial tiles in latent pixels, 0: untiled (seam-exact either way)")
    args = parser.parse_args()
    speed(args) if args.what == "speed" else memory(args)


if __name__ == "__main__":
    main()
