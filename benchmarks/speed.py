"""The speed benchmark: TAESD's executors against their peers, each in its own process.

Each competitor runs as its users run it by default (its own allocator, layout and threads) in a
separate worker process, ``python benchmarks/speed.py worker NAME``, driven over stdin/stdout with JSON
lines. Per configuration (encode/decode x size x batch) fresh workers are started, warmed up, then
called in turns A B C A B C ... so that background load hits all of them alike; ratios are only
meaningful within one run. A ``conv-peak`` worker times one channels_last 3x3 64->64 convolution in
the same turns: the machine's achievable conv rate that the network's GFLOP/s is compared with.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

VARIANT = "taesd"   # the base network; diffusers AutoencoderTiny's default config is the same one

COMPETITORS = {
    "taesd": "taesd.load default: fast executor, fp32 model (computing in bf16 on AMX CPUs)",
    "taesd-fp32": "taesd fast executor, dtype='fp32' asked for (computes in fp32 on every CPU)",
    "taesd-onednn": "taesd.load default with TAESD_AMX=0: bf16 compute on oneDNN's kernels only (AMX CPUs)",
    "taesd-direct": "taesd fast executor without Winograd (direct convolutions only, TAESD_WINOGRAD=0), "
                    "in the default precision",
    "taesd-bf16": "taesd fast executor, dtype=bfloat16",
    "taesd-compile": "taesd compiled mode (torch.compile), fp32",
    "plain": "published network, eager fp32 (taesd executor='plain')",
    "diffusers": "diffusers AutoencoderTiny, fp32",
    "onnxruntime": "ONNX Runtime, export of the published network, fp32",
    "openvino": "OpenVINO CPU, the same ONNX export, its default precision (INFERENCE_PRECISION_HINT: bf16 "
                "on CPUs with AVX-512-BF16 or AMX)",
    "openvino-f32": "OpenVINO CPU, the same ONNX export, INFERENCE_PRECISION_HINT=f32",
    "sd-vae": "full SD VAE (diffusers AutoencoderKL, SD 1.5 config), fp32",
}
PEAK = "conv-peak"
PEAK_SHAPE = (1, 64, 256, 256)


@contextlib.contextmanager
def environment(**values: str):
    """Environment variables set for the duration of a block (taesd reads its settings per call)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------- FLOPs

def conv_flops(module: nn.Module, x: torch.Tensor) -> int:
    """2 x multiply-adds of every convolution in ``module`` on input ``x`` (from the layer list)."""
    total = 0

    def hook(conv, inputs, out):
        nonlocal total
        k = conv.kernel_size[0] * conv.kernel_size[1]
        total += 2 * out.numel() * (conv.in_channels // conv.groups) * k

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    with torch.inference_mode():
        module(x)
    for h in handles:
        h.remove()
    return total


def network_gflop(op: str, size: int, batch: int) -> float:
    """The published network's FLOPs for one call; measured at 64x64 and scaled (linear in area)."""
    from taesd.model import create
    model = create(VARIANT)
    small = 64
    if op == "decode":
        x = torch.zeros(1, model.variant.latent_channels, small // 8, small // 8)
    else:
        x = torch.zeros(1, 3, small, small)
    return conv_flops(getattr(model, op + "r"), x) * batch * (size / small) ** 2 / 1e9


# ---------------------------------------------------------------- worker side

def _make_call(name: str, op: str, size: int, batch: int):
    """A zero-argument function doing one encode/decode the way ``name``'s users call it."""
    torch.manual_seed(0)
    latent = torch.randn(batch, 4, size // 8, size // 8)
    image = torch.rand(batch, 3, size, size)
    if name == PEAK:
        conv = nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)
        x = torch.rand(*PEAK_SHAPE).contiguous(memory_format=torch.channels_last)
        return lambda: conv(x)
    if name.startswith("taesd") or name == "plain":
        import taesd
        from taesd.runtime.executors.compile import compile_model
        from taesd.runtime.executors.cpu import CpuExecutor, make_fast
        model = taesd.create(VARIANT)
        if name == "taesd":
            make_fast(model)
        elif name == "taesd-fp32":
            CpuExecutor(bf16=False).apply(model)
        elif name == "taesd-onednn":
            os.environ["TAESD_AMX"] = "0"    # this worker process only
            make_fast(model)
        elif name == "taesd-direct":
            make_fast(model, use_winograd=False)
        elif name == "taesd-bf16":
            make_fast(model.to(torch.bfloat16))
        elif name == "taesd-compile":
            compile_model(model)
        return (lambda: model.decode(latent)) if op == "decode" else (lambda: model.encode(image))
    if name == "diffusers":
        from diffusers import AutoencoderTiny
        vae = AutoencoderTiny().eval()
        image = image * 2 - 1
        return (lambda: vae.decode(latent).sample) if op == "decode" else (lambda: vae.encode(image).latents)
    if name == "sd-vae":
        from diffusers import AutoencoderKL
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
        image = image * 2 - 1
        return (lambda: vae.decode(latent).sample) if op == "decode" else (lambda: vae.encode(image).latent_dist.mode())
    if name in ("onnxruntime", "openvino", "openvino-f32"):
        return _onnx_call(op, latent if op == "decode" else image, name)
    raise ValueError(f"unknown competitor {name!r}")


def export_onnx(module: nn.Module, example: torch.Tensor) -> str:
    """The plain module exported to ONNX (dynamic batch and size) into a temporary folder, removed
    when the process ends."""
    folder = tempfile.mkdtemp(prefix="taesd-bench-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = os.path.join(folder, "model.onnx")
    dims = {0: "n", 2: "h", 3: "w"}
    with torch.no_grad():
        torch.onnx.export(module, (example,), path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": dims, "y": dims}, dynamo=False)
    return path


def onnx_runner(module: nn.Module, example: torch.Tensor, engine: str):
    """A function numpy input -> numpy output running ``module``'s ONNX export with ``engine``:
    "onnxruntime" (ORT defaults), "openvino" (OpenVINO defaults) or "openvino-f32"."""
    path = export_onnx(module, example)
    if engine == "onnxruntime":
        import onnxruntime as ort
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"x": x})[0]
    import openvino as ov
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"} if engine == "openvino-f32" else {}
    compiled = {}

    def run(x):   # compiled per input shape, static (as OpenVINO's users deploy it: fastsdcpu)
        if x.shape not in compiled:
            model = core.read_model(path)
            model.reshape({"x": list(x.shape)})
            compiled[x.shape] = core.compile_model(model, "CPU", config)
        return compiled[x.shape]({"x": x})[0]
    return run


def openvino_precision(engine: str = "openvino") -> str:
    """What OpenVINO's CPU plugin reads for INFERENCE_PRECISION_HINT under ``engine``'s config."""
    import openvino as ov
    core = ov.Core()
    if engine == "openvino-f32":
        core.set_property("CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    hint = core.get_property("CPU", "INFERENCE_PRECISION_HINT")
    return hint.to_string() if hasattr(hint, "to_string") else str(hint)


def _onnx_call(op: str, x: torch.Tensor, engine: str = "onnxruntime"):
    """Export the plain published module to ONNX, run it with ``engine``'s defaults."""
    from taesd.model import create
    module = getattr(create(VARIANT), op + "r")
    run = onnx_runner(module, x[:1, :, :64, :64] if op == "encode" else x[:1, :, :8, :8], engine)
    feed = x.numpy()
    run(feed)   # OpenVINO compiles on the first call of a shape: outside the timing
    return lambda: run(feed)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(name: str) -> None:
    """Serve JSON-line requests on stdin: setup {op,size,batch,warmup}, call, peak, quit."""
    call = None
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "setup":
            call = _make_call(name, req["op"], req["size"], req["batch"])
            base_rss = _rss_bytes()   # after imports and model: the peak counts the calls' memory
            with torch.inference_mode():
                for _ in range(req["warmup"]):
                    call()
            reply = {"ok": True, "base_rss": base_rss}
        elif req["cmd"] == "call":
            with torch.inference_mode():
                t = time.perf_counter()
                call()
                reply = {"t": time.perf_counter() - t}
        elif req["cmd"] == "peak":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            reply = {"peak_rss": peak}
        else:
            return
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ---------------------------------------------------------------- driver side

class Worker:
    def __init__(self, name: str):
        self.name = name
        env = dict(os.environ)
        src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", name], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.name} died (see its messages above)")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=60)


@dataclass
class Row:
    op: str
    size: int
    batch: int
    name: str
    times: list[float] = field(default_factory=list)
    peak_mib: float = 0.0
    gflop: float = 0.0
    peak_gflops: float = 0.0   # the conv-peak rate measured in the same turns

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def gflops(self) -> float:
        return self.gflop / self.median

    @property
    def images_per_s(self) -> float:
        return self.batch / self.median


def run_config(op: str, size: int, batch: int, names: list[str], calls: int, warmup: int,
               progress=None, fewer_calls: dict[str, int] | None = None) -> list[Row]:
    """Fresh workers for every competitor (and the conv peak), then ``calls`` rounds in turns;
    ``fewer_calls`` caps some competitors (the slow full VAE)."""
    fewer_calls = fewer_calls or {}
    workers = [Worker(n) for n in names + [PEAK]]
    try:
        base = {}
        for w in workers:
            base[w.name] = w.ask(cmd="setup", op=op, size=size, batch=batch, warmup=warmup)["base_rss"]
        rows = {w.name: Row(op, size, batch, w.name) for w in workers}
        for turn in range(calls):
            for w in workers:
                if turn >= fewer_calls.get(w.name, calls):
                    continue
                time.sleep(0.05)  # let the previous worker's spinning threads go idle
                rows[w.name].times.append(w.ask(cmd="call")["t"])
                if progress:
                    progress()
        gflop = network_gflop(op, size, batch)
        peak_gflop = 2 * 64 * 64 * 9 * PEAK_SHAPE[0] * PEAK_SHAPE[2] * PEAK_SHAPE[3] / 1e9
        peak_rate = peak_gflop / min(rows[PEAK].times)
        for w in workers:
            r = rows[w.name]
            r.peak_mib = (w.ask(cmd="peak")["peak_rss"] - base[w.name]) / 2**20
            r.gflop = peak_gflop if w.name == PEAK else gflop
            r.peak_gflops = peak_rate
        return [rows[n] for n in names] + [rows[PEAK]]
    finally:
        for w in workers:
            w.close()


def machine_facts() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        flags = set(next(l for l in info.splitlines() if l.startswith("flags")).split())
        isa = ", ".join(sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "avx_vnni", "fma"))))
    except (OSError, StopIteration):
        isa = "?"
    return [f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
            f"ISA: {isa}",
            f"oneDNN/PyTorch CPU capability: {torch.backends.cpu.get_cpu_capability()}",
            f"torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}",
            f"Winograd kernel (taesd default): {_winograd_fact()}",
            f"AMX kernel (taesd's bf16 compute): {_amx_fact()}",
            f"narrow conv kernel (the decoder's last conv): {_narrow_fact()}",
            f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}"]


def _narrow_fact() -> str:
    import torch

    from taesd.runtime import isa, narrow
    if not narrow.available():
        return f"not used ({narrow.load_error() or 'TAESD_WINOGRAD=0'})"
    return "built (fp32" + (", bf16)" if narrow.available(torch.bfloat16) and isa.winograd_bf16() else ")")


def _amx_fact() -> str:
    from taesd.runtime import amx
    return "built" if amx.available() else f"not used ({amx.load_error() or 'TAESD_AMX=0'})"


def _winograd_fact() -> str:
    from taesd.runtime import winograd
    if not winograd.enabled():
        return f"switched off ({winograd.ENV_SWITCH}=0)"
    return f"built ({winograd.library_path().name})" if winograd.available() else f"not available ({winograd.load_error()})"


def table(rows: list[Row]) -> str:
    """Markdown: per configuration, each competitor's median (min-max), speed-up, GFLOP/s, memory."""
    head = ("| op | size | batch | path | median s (min-max) | images/s | x vs diffusers | x vs ONNX RT "
            "| GFLOP/s | % of conv peak | peak RSS MiB |")
    lines = [head, "|" + " --- |" * 11]
    configs = {}
    for r in rows:
        configs.setdefault((r.op, r.size, r.batch), []).append(r)
    for (op, size, batch), group in configs.items():
        ref = {r.name: r.median for r in group}
        for r in group:
            vs = lambda other: f"{ref[other] / r.median:.2f}" if other in ref else "-"
            lines.append(
                f"| {op} | {size}² | {batch} | {r.name} | {r.median:.3f} ({min(r.times):.3f}-{max(r.times):.3f}) "
                f"| {r.images_per_s:.2f} | {vs('diffusers')} | {vs('onnxruntime')} | {r.gflops:.0f} "
                f"| {100 * r.gflops / r.peak_gflops:.0f}% | {r.peak_mib:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- accuracy and the report

def _astronaut(size: int) -> torch.Tensor:
    import skimage.data
    import torch.nn.functional as F
    x = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def float64_lines(plain, fast, batches: dict) -> list[str]:
    """Max abs error of plain fp32 and of the fast default against a float64 evaluation of the same
    network. Latents amplify rounding (plain fp32 itself can be ~1e-4 off), so this is the yardstick
    for any fp32 path that sums in another order (Winograd, ONNX Runtime, another layout)."""
    import copy
    exact = copy.deepcopy(plain).double()
    lines = ["Error against a float64 evaluation of the same network (max abs; latents | pixels):", "",
             "| input | plain fp32 encode | fast encode | fast vs plain encode | plain fp32 decode | fast decode | fast vs plain decode |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, x in batches.items():
        z, z64, zf = plain.encode(x), exact.encode(x.double()), fast.encode(x)
        y, y64, yf = plain.decode(z), exact.decode(z.double()), fast.decode(z)
        err = lambda a, b: f"{(a.double() - b.double()).abs().max().item():.1e}"  # noqa: E731
        lines.append(f"| {name} | {err(z, z64)} | {err(zf, z64)} | {err(zf, z)} | {err(y, y64)} | {err(yf, y64)} | {err(yf, y)} |")
    return lines


def accuracy_lines(weights_dir, photos=("astronaut", "coffee", "chelsea"), size=256) -> list[str]:
    """The modes against the plain fp32 network on taef2's published weights and real photos:
    max abs difference (fp32 modes), PSNR (reduced precision, previews against the downscaled
    full decode)."""
    import numpy as np
    import skimage.data
    import torch.nn.functional as F

    from taesd.evaluation.metrics import psnr
    from taesd.loader import load
    from taesd.runtime.preview_decode import preview_decode
    plain = load("taef2", weights_dir, device="cpu", executor="plain")
    fast = load("taef2", weights_dir, device="cpu")
    bf16 = load("taef2", weights_dir, device="cpu", dtype=torch.bfloat16)
    images = []
    for name in photos:
        arr = getattr(skimage.data, name)()[:size, :size, :3]
        images.append(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255)
    x = torch.stack(images)
    z = plain.encode(x)
    ref = plain.decode(z)
    lines = [f"taef2 published weights, photos {', '.join(photos)} ({size}x{size} crops), "
             "against the plain fp32 eager network:", "",
             "| mode | encode | decode |", "| --- | --- | --- |"]
    lines.append(f"| fast fp32 (default) | max abs diff {(fast.encode(x) - z).abs().max().item():.1e} "
                 f"| max abs diff {(fast.decode(z) - ref).abs().max().item():.1e} |")
    lines += [""] + float64_lines(plain, fast, {f"{len(photos)} crops {size}²": x,
                                               "astronaut 1024² (upscaled)": _astronaut(1024)}) + [""]
    lines += ["| mode | encode | decode |", "| --- | --- | --- |"]
    lines.append(f"| bf16 | PSNR of the decode from bf16 latents {psnr(plain.decode(bf16.encode(x).float()), ref).mean():.1f} dB "
                 f"| PSNR {psnr(bf16.decode(z).float(), ref).mean():.1f} dB |")
    for factor in (2, 4):
        pre = preview_decode(fast, z, factor)
        lines.append(f"| preview 1/{factor} size | - | PSNR {psnr(pre, F.avg_pool2d(ref, factor)).mean():.1f} dB "
                     f"against the full decode downscaled {factor}x |")
    return lines


def write_report(path, rows: list[Row], facts: list[str], accuracy: list[str], notes: list[str]) -> None:
    from taesd.io.files import atomic_path
    text = "\n".join(
        ["# TAESD speed benchmark", "", "Written by `taesd bench` (benchmarks/bench_speed.py). "
         "Every competitor runs in its own process as its users run it by default; per configuration "
         "the processes are called in turns (A B C A B C ...) after warm-up, so ratios are same-run "
         "ratios. GFLOP/s is the published network's convolution count (2 x multiply-adds) per second for "
         "every path. taesd executes fewer multiply-adds than that count (its 3x3 convolutions run as "
         "Winograd F(2x2,3x3) in the encoder and F(4x4,3x3) in the decoder, its upsample+conv pairs as "
         "2x2 phase convolutions), so its GFLOP/s and % of the conv peak are effective rates and can "
         "pass 100%; taesd-direct is the same executor with direct convolutions only. The conv peak is a "
         "channels_last 3x3 64->64 convolution on 1x64x256x256 timed in the same turns (best call).",
         "", "## Machine", ""] + [f"- {f}" for f in facts] +
        ["", "## Speed (fp32 unless named; the network is the base TAESD, fresh weights)", "", table(rows), ""] +
        ["## Accuracy", ""] + accuracy + ["", "## Notes", ""] + [f"- {n}" for n in notes] + [""])
    with atomic_path(path) as tmp:
        tmp.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        worker(sys.argv[2])
    else:
        sys.exit("usage: python benchmarks/speed.py worker NAME  (the driver is benchmarks/bench_speed.py)")
