"""What a video preview costs: one preview of each kind (VideoPreviewCallback) against TAEHV decoding
the whole clip, taew2_1 with fresh weights, on this machine's CPU.

    PYTHONPATH=src python benchmarks/bench_video_preview.py [--size 480x832] [--frames 81] [--reps 3]
        [--device cuda] [--half]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from taesd.integrations.diffusers.preview_video import VideoPreviewCallback
from taesd.integrations.diffusers.video import TaehvVAE
from taesd.video import TAEHV


class _WanLike:   # what the callback reads from a Wan pipeline, without a transformer
    def __init__(self, vae):
        self.vae, self.scheduler, self._num_timesteps = vae, None, 1000


_WanLike.__name__ = "WanPipeline"


def _median_ms(fn, reps: int, device: str) -> float:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    fn()  # warm-up (allocator, fast kernels)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="480x832")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--half", action="store_true", help="fp16 (on a GPU)")
    args = ap.parse_args()
    h, w = map(int, args.size.split("x"))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "taew2_1.pth"
        torch.save(TAEHV("taew2_1").state_dict(), path)
        vae = TaehvVAE.from_file(path, "taew2_1", chunk=16)   # bounded memory: 16 frames per step
    dtype = torch.float16 if args.half else torch.float32
    torch.nn.Module.to(vae, args.device, dtype)
    pipe = _WanLike(vae)
    latents = torch.randn(1, 16, (args.frames - 1) // 4 + 1, h // 8, w // 8, device=args.device, dtype=dtype)
    rows = []
    for label, kw in [("first frame (temporal upsampling off)", dict(frames="first")),
                      ("first frame (temporal upsampling on)", dict(frames="first", time_upscale=True)),
                      (f"every 4th latent frame ({-(-latents.shape[2] // 4)} frames)", dict(frames=4)),
                      ("all, capped at 8 latent frames", dict(frames="all", max_frames=8, chunk=4)),
                      ("all latent frames", dict(frames="all", max_frames=None, chunk=4))]:
        cb = VideoPreviewCallback(pipe, on_preview=lambda _: None, **kw)
        rows.append((label, _median_ms(lambda cb=cb: cb(pipe, 0, 0.0, {"latents": latents}), args.reps,
                                       args.device)))
    full = _median_ms(lambda: vae.decode(latents), args.reps, args.device)
    compute = vae.taehv.compute_dtype or dtype    # set by the fast executor: bf16 on AMX CPUs
    print(f"taew2_1, {args.frames} frames at {h}x{w} ({latents.shape[2]} latent frames), {args.device} "
          f"{dtype} in and out, computing in {compute}, {torch.get_num_threads()} threads")
    print("| preview | ms | share of a whole-clip TAEHV decode |\n|---|---:|---:|")
    for label, ms in rows:
        print(f"| {label} | {ms:.0f} | {ms / full:.1%} |")
    print(f"| (whole clip, TaehvVAE.decode, 16 frames per step) | {full:.0f} | 100% |")


if __name__ == "__main__":
    main()
