"""Per-layer A/B of taesd's own kernels against cuDNN: `python benchmarks/bench_kernels.py -o K.md`.

The decoder's layers at a 512² decode (64 channels on 64²..512² maps, batch 1 and 16), each run by
every path that can run it: cuDNN unfused (the ops one by one), cuDNN fused (torch's
cudnn_convolution_relu / _add_relu), our Triton NHWC implicit-GEMM kernel with the fused epilogue,
and for nearest-2x upsample + 3x3 conv the sub-pixel forms (cuDNN stride-2 transposed conv, our
Triton phase kernel). Time per call: CUDA events around 10 calls, the best of 5 (perf_counter on the
CPU); error: max abs difference against the fp32 conv of the same (rounded) inputs. The whole-network
A/B (in separate processes, alternated) is in bench_gpu.py's table (taesd-subpixel, -triton rows).
`--device cpu` runs tiny shapes (with TRITON_INTERPRET=1 the Triton rows run in the interpreter):
the smoke test of this script. benchmarks/gpu_check.sh runs it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())}] {msg}", file=sys.stderr, flush=True)


def timed(fn, device: str, calls: int = 10, trials: int = 5) -> float:
    """Seconds per call: the best over ``trials`` of the mean of ``calls`` back-to-back calls."""
    for _ in range(min(3, calls)):
        fn()
    best = float("inf")
    for _ in range(trials):
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3 / calls)
        else:
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - t) / calls)
    return best


# Launch shapes tried for the Triton kernel (block_m, num_warps, num_stages); the best is a row.
SWEEP = [(64, 4, 2), (128, 4, 3), (128, 8, 2), (256, 8, 2)]


def layer_paths(kind: str, x, w, b, r, kernels, device: str, sweep: bool = False) -> dict:
    """path name -> zero-argument call, for one layer ``kind`` on input ``x`` (weights ``w``, bias
    ``b``, residual ``r``); paths that cannot run here are left out."""
    args = ([1, 1], [1, 1], [1, 1], 1)
    paths = {}
    triton_ok = kernels is not None and kernels.available(device)
    if kind == "conv+relu":
        paths["cudnn"] = lambda: F.conv2d(x, w, b, padding=1).relu_()
        if device == "cuda":
            paths["cudnn-fused"] = lambda: torch.cudnn_convolution_relu(x, w, b, *args)
        if triton_ok:
            gw = kernels.gemm_weights(w)
            paths["triton"] = lambda: kernels.conv3x3_nhwc(x, gw, b, relu=True)
    elif kind == "conv+residual+relu":
        paths["cudnn"] = lambda: F.conv2d(x, w, b, padding=1).add_(r).relu_()
        if device == "cuda":
            paths["cudnn-fused"] = lambda: torch.cudnn_convolution_add_relu(x, w, r, None, b, *args)
        if triton_ok:
            gw = kernels.gemm_weights(w)
            paths["triton"] = lambda: kernels.conv3x3_nhwc(x, gw, b, r, relu=True)
    else:  # upsample+conv: x is the small map
        paths["cudnn"] = lambda: F.conv2d(
            F.interpolate(x, scale_factor=2, mode="nearest"), w, None, padding=1
        )
        if kernels is not None:
            tw = kernels.tconv_weight(w).contiguous(memory_format=torch.channels_last)
            paths["subpixel-tconv"] = lambda: F.conv_transpose2d(x, tw, None, stride=2, padding=1)
        if triton_ok:
            pw = kernels.phase_weights(w)
            paths["subpixel-triton"] = lambda: kernels.conv3x3_nhwc(x, pw, None, phases=4)
    if triton_ok and sweep:  # the same Triton call at other launch shapes
        name = "subpixel-triton" if kind == "upsample+conv" else "triton"
        call = {
            "conv+relu": lambda cfg: kernels.conv3x3_nhwc(x, gw, b, relu=True, config=cfg),
            "conv+residual+relu": lambda cfg: kernels.conv3x3_nhwc(x, gw, b, r, relu=True, config=cfg),
            "upsample+conv": lambda cfg: kernels.conv3x3_nhwc(x, pw, None, phases=4, config=cfg),
        }[kind]
        for bm, warps, stages in SWEEP:
            cfg = {"block_m": bm, "num_warps": warps, "num_stages": stages}
            if any(cfg[k] != kernels.CONFIG[k] for k in cfg):
                paths[f"{name}@{bm}/{warps}/{stages}"] = lambda cfg=cfg: call(cfg)
    return paths


def reference(kind: str, x, w, b, r) -> torch.Tensor:
    x, w = x.float(), w.float()
    if kind == "upsample+conv":
        return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, None, padding=1)
    y = F.conv2d(x, w, b.float(), padding=1)
    return (y + r.float()).relu() if kind == "conv+residual+relu" else y.relu()


def cases(small: bool) -> list[tuple[str, int, int, int]]:
    """(layer kind, channels, input map side, batch): the decoder's layers at a 512² decode."""
    c, maps, batches = (16, (8, 16), (1,)) if small else (64, (64, 128, 256, 512), (1, 16))
    out = []
    for side in maps:  # batch 1 and 16 side by side, so a spent time budget cuts the biggest maps only
        for batch in batches:
            out += [("conv+relu", c, side, batch), ("conv+residual+relu", c, side, batch)]
            if side < maps[-1]:
                out.append(("upsample+conv", c, side, batch))
    return out


def run(args) -> int:
    try:
        from bench_gpu import _kernels

        kernels = _kernels()
    except (ImportError, RuntimeError) as e:
        log(f"no cuda_kernels module ({e}): cuDNN rows only")
        kernels = None
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    started = time.time()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for kind, c, side, batch in cases(args.small):
        if time.time() - started > args.budget_s:
            rows.append((kind, side, batch, "(time budget spent: not run)", None, None, None, None))
            continue
        cl = torch.channels_last
        x = torch.randn(batch, c, side, side, generator=gen).to(device, dtype).contiguous(memory_format=cl)
        w = (torch.randn(c, c, 3, 3, generator=gen) * (2 / (9 * c)) ** 0.5).to(device, dtype)
        w = w.contiguous(memory_format=cl)
        b = (torch.randn(c, generator=gen) * 0.1).to(device, dtype)
        r = torch.randn(batch, c, side, side, generator=gen).to(device, dtype).contiguous(memory_format=cl)
        ref = reference(kind, x, w, b, r)
        out_side = 2 * side if kind == "upsample+conv" else side
        flop = 2 * batch * out_side**2 * c * c * 9
        traffic = x.nbytes + batch * c * out_side**2 * x.element_size() * (2 if kind.startswith("conv+res") else 1)
        base = None
        for path, fn in layer_paths(kind, x, w, b, r, kernels, device, args.sweep).items():
            try:
                with torch.inference_mode():
                    err = (fn().float() - ref).abs().max().item()
                    t = timed(fn, device, calls=args.calls, trials=args.trials)
            except Exception as e:  # noqa: BLE001 - a path that fails is a row
                rows.append((kind, side, batch, path, None, None, None, f"{type(e).__name__}: {e}"[:120]))
                continue
            base = t if path == "cudnn" else base
            rows.append((kind, side, batch, path, t, flop / t / 1e12, traffic / t / 1e9,
                         (base / t if base else None, err)))
            log(f"{kind} {side}² x{batch} {path}: {1e6 * t:.1f} us, max abs diff {err:.2e}")
        write(args.output, rows, device, dtype, c)
    write(args.output, rows, device, dtype, c)
    return 0


def write(path, rows, device, dtype, c) -> None:
    lines = [
        "## Kernels: per-layer A/B (bench_kernels.py)",
        "",
        f"{device}, {str(dtype).removeprefix('torch.')}, {c} channels, NHWC (channels_last); us per call: "
        "CUDA events around 10 calls, best of 5; min traffic: input + output (+ residual) once; "
        "max abs diff against the fp32 conv of the same inputs. 'map' is the layer's input side. "
        "triton@M/W/S: the Triton kernel at block_m M, W warps, S stages (only the fastest of the sweep "
        "is shown; plain 'triton' is cuda_kernels.CONFIG).",
        "",
        "| layer | map | batch | path | us/call | TFLOP/s | min-traffic GB/s | x vs cudnn | max abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    best: dict = {}
    best_triton: dict = {}  # of the Triton launch shapes, only the fastest gets a row
    for kind, side, batch, p, t, *_ in rows:
        if t is not None and "triton" in p:
            key = (kind, side, batch)
            if key not in best_triton or t < best_triton[key][1]:
                best_triton[key] = (p, t)
    for kind, side, batch, p, t, tflops, gbps, extra in rows:
        if t is None:
            lines.append(f"| {kind} | {side}² | {batch} | {p} | {extra or '-'} | - | - | - | - |")
            continue
        key = (kind, side, batch)
        if "@" in p and best_triton.get(key, (None,))[0] != p:
            continue
        speedup, err = extra
        lines.append(
            f"| {kind} | {side}² | {batch} | {p} | {1e6 * t:.1f} | {tflops:.1f} | {gbps:.0f} "
            f"| {'-' if speedup is None else f'{speedup:.2f}'} | {err:.1e} |"
        )
        if key not in best or t < best[key][1]:
            best[key] = (p, t)
    lines += ["", "Fastest path per layer:", ""]
    lines += [f"- {k[0]} {k[1]}² x{k[2]}: {p} ({1e6 * t:.1f} us)" for k, (p, t) in best.items()]
    wins: dict = {}
    for (kind, _s, _b), (p, _t) in best.items():
        wins.setdefault(kind, {}).setdefault(p, 0)
        wins[kind][p] += 1
    lines += ["", "Wins per layer kind: " + "; ".join(
        f"{k}: " + ", ".join(f"{p} {n}" for p, n in v.items()) for k, v in wins.items())]
    Path(path).write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_kernels.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes (the CPU smoke run)")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--sweep", action="store_true", help="also time the Triton kernel at other launch shapes")
    p.add_argument("--budget-s", type=float, default=60)
    p.add_argument("-o", "--output", default=str(HERE / "KERNELS.md"))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
