"""A 512x512 decode through a pipeline's VAE: TaesdVAE (our network and executor) vs diffusers'
AutoencoderTiny holding the same weights (fresh taesd weights), same process, CPU, fp32.

Both are called the way a pipeline calls its VAE: ``vae.decode(latents, return_dict=False)[0]``
on 1 x 4 x 64 x 64 latents, images in [-1, 1]. The two alternate (A B A B ...) after warm-up so
machine load hits both alike; the table gives the median of --repeats runs each. Also reported:
the largest difference between the two outputs (same weights, so it is rounding only).

    PYTHONPATH=src python3 benchmarks/bench_diffusers.py            # 2 threads, 7 repeats
    PYTHONPATH=src python3 benchmarks/bench_diffusers.py --threads 4 --repeats 11

Writes the table to benchmarks/DIFFUSERS.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent


def build(seed: int):
    import taesd
    from taesd.integrations.diffusers import TaesdVAE
    from taesd.integrations.diffusers.vae import autoencoder_tiny
    model = taesd.create("taesd", seed=seed)
    theirs = autoencoder_tiny(model)              # diffusers' implementation, our weights
    ours = TaesdVAE.from_taesd(model)             # our network, the fast executor
    return ours, theirs


def timed(vae, z) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = vae.decode(z, return_dict=False)[0]
    return time.perf_counter() - t0, out


def run(threads: int, repeats: int, warmup: int, size: int) -> dict:
    torch.set_num_threads(threads)
    ours, theirs = build(seed=0)
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    for _ in range(warmup):
        timed(ours, z), timed(theirs, z)
    times = {"TaesdVAE": [], "AutoencoderTiny": []}
    for _ in tqdm(range(repeats), desc="decode A/B", unit="pair"):
        t, a = timed(ours, z)
        times["TaesdVAE"].append(t)
        t, b = timed(theirs, z)
        times["AutoencoderTiny"].append(t)
    diff = float((a - b.clamp(-1, 1)).abs().max())
    return {"times": times, "diff": diff}


def table(result: dict, threads: int, size: int) -> str:
    med = {k: statistics.median(v) for k, v in result["times"].items()}
    speedup = med["AutoencoderTiny"] / med["TaesdVAE"]
    rows = [f"# TaesdVAE vs diffusers' AutoencoderTiny: {size}x{size} decode through pipe.vae",
            "",
            f"CPU ({platform.processor() or platform.machine()}), fp32, {threads} threads, torch "
            f"{torch.__version__}; fresh taesd weights in both; median of "
            f"{len(result['times']['TaesdVAE'])} alternating runs after warm-up.",
            "",
            "| VAE | median ms | min ms | speed-up |",
            "| --- | ---: | ---: | ---: |"]
    for name, ts in result["times"].items():
        rows.append(f"| {name} | {statistics.median(ts) * 1000:.1f} | {min(ts) * 1000:.1f} | "
                    f"{med['AutoencoderTiny'] / statistics.median(ts):.2f}x |")
    rows += ["", f"Speed-up of TaesdVAE: **{speedup:.2f}x** (target >= 1.8x). Largest output difference "
             f"(same weights; Winograd rounding): {result['diff']:.2e} in [-1, 1].", ""]
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs of each (>= 5)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--out", type=Path, default=HERE / "DIFFUSERS.md")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be 5 or more")
    text = table(run(args.threads, args.repeats, args.warmup, args.size), args.threads, args.size)
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
