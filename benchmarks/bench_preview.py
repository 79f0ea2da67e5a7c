"""What a live preview costs per step, next to the full VAE's decode of the same latent.

Real diffusers pipelines with tiny denoisers (tests/pipeline_configs.py) but the family's real-size
VAE (the published config, fresh weights: timing does not depend on weight values) generate one
image; the PreviewCallback previews every step and measures itself; then the pipeline's own VAE
and TAESD decode the final latent of that same run.

    PYTHONPATH=src TAESD_WEIGHTS=/work/shared/weights python3 benchmarks/bench_preview.py
Writes benchmarks/PREVIEW.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pipeline_configs as pc  # noqa: E402
import taesd  # noqa: E402
from taesd.integrations.diffusers.contracts import contract_for, pipeline_to_raw, pipeline_to_taesd  # noqa: E402
from taesd.integrations.diffusers.preview import PreviewCallback  # noqa: E402


def real_vae(variant: str):
    """The family's published VAE architecture (default configs are the released ones)."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2
    torch.manual_seed(0)
    if variant == "taef2":
        return AutoencoderKLFlux2().eval()
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
                         scaling_factor=0.18215).eval()


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(variant: str, size: int, steps: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        pipe = pc.BUILDERS[variant](Path(tmp))
    pipe.set_progress_bar_config(disable=True)
    pipe.vae = real_vae(variant)
    model = taesd.load("taef2", device="cpu") if variant == "taef2" else taesd.create(variant, seed=0)
    finals = []

    def keep_last(p, step, t, kwargs):
        finals[:] = [kwargs["latents"].detach().clone()]
        return preview(p, step, t, kwargs)

    inputs = {**pc.inputs(variant), "height": size, "width": size, "num_inference_steps": steps,
              "output_type": "latent"}
    with PreviewCallback(pipe, model, max_size=None, on_preview=lambda f: None) as preview:
        pipe(**inputs, callback_on_step_end=keep_last)
    contract = contract_for(pipe)
    raw = pipeline_to_raw(finals[0], contract, size, size)
    z = pipeline_to_taesd(finals[0], contract, size, size)
    cost = preview.cost()
    return {"variant": variant, "size": size, "latent": "x".join(map(str, z.shape[1:])), "steps": steps,
            "preview_s": cost["median_s"], "preview_decode_s": cost["decode_median_s"],
            "taesd_s": median_seconds(lambda: model.decode(z), repeats),
            "vae_s": median_seconds(lambda: pipe.vae.decode(raw), repeats)}


def table(rows: list[dict]) -> str:
    lines = ["| family | image | TAESD latent | preview per step (callback, median) | of which TAESD decode "
             "| TAESD decode alone | full VAE decode | full VAE / preview |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['size']}x{r['size']} | {r['latent']} | {r['preview_s'] * 1000:.0f} ms "
                     f"| {r['preview_decode_s'] * 1000:.0f} ms | {r['taesd_s'] * 1000:.0f} ms "
                     f"| {r['vae_s'] * 1000:.0f} ms | {r['vae_s'] / r['preview_s']:.1f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512: a 64x64 latent)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed decodes of the final latent (median)")
    p.add_argument("--families", nargs="+", default=["taesd", "taef2"], choices=list(pc.BUILDERS))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("-o", "--out", default=str(ROOT / "benchmarks" / "PREVIEW.md"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [bench(v, args.size, args.steps, args.repeats) for v in args.families]
    text = table(rows)
    print(text)
    host = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    from taesd.io.files import atomic_path
    with atomic_path(args.out) as tmp:
        tmp.write_text("# Preview cost per step vs the full VAE\n\n"
                       "Same run: a real diffusers pipeline (tiny denoiser, the family's real-size VAE with "
                       "fresh weights) previews every step with `PreviewCallback`; its final latent is then "
                       f"decoded by TAESD and by the pipeline's VAE (median of {args.repeats}). CPU: {host}. "
                       "The machine was shared with other jobs: numbers are noisy.\n\n"
                       f"{text}\n\nReproduce: `PYTHONPATH=src TAESD_WEIGHTS=... python3 benchmarks/bench_preview.py`\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
