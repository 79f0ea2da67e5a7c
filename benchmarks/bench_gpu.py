"""The GPU benchmark: `python benchmarks/bench_gpu.py [options]` (also `taesd bench --device cuda`).

TAESD's CUDA executor against its peers on one GPU: diffusers AutoencoderTiny eager fp16, the same
under torch.compile, ONNX Runtime's CUDA provider (where onnxruntime-gpu is installed) and the full SD
VAE (AutoencoderKL, SD 1.5 config, random weights: nothing is downloaded). Every competitor runs in
its own long-lived worker process (`bench_gpu.py worker NAME`, JSON lines over stdin/stdout); per
configuration each is set up and warmed up, then the workers are called in turns (A B C A B C ...)
and every call is timed with CUDA events. Peak memory is torch.cuda.max_memory_allocated over the
calls, above what the worker held before them (weights and inputs). Probes in the same run measure
the copy bandwidth and an fp16 matrix product, the ceilings the network's rates are compared with,
next to the datasheet numbers of known GPUs.

`bench_gpu.py accuracy` checks every reduced-precision path against the fp32 network on the taef2
weights and real photos (PSNR, bar 40 dB). `--device cpu` runs the same harness on the CPU with tiny
sizes (the smoke test of the harness, tests/test_cuda_path.py). benchmarks/gpu_check.sh runs it all.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

VARIANT = "taesd"  # the base network; diffusers' AutoencoderTiny default config is the same one
COMPETITORS = {
    "taesd": "taesd.load default on the device (CUDA: fp16, CUDA graphs, fused cuDNN, channels_last)",
    "taesd-subpixel": "taesd default, the decoder's upsample+conv pairs as one sub-pixel convolution "
    "(cuDNN stride-2 transposed conv; cuda_kernels.rewrite)",
    "taesd-subpixel-triton": "taesd default, the sub-pixel upsample+conv in our Triton phase kernel",
    "taesd-triton": "taesd default, every 3x3 conv and Block in our Triton NHWC implicit-GEMM kernel "
    "(fused bias/residual/ReLU epilogues; sub-pixel Triton too)",
    "taesd-eager": "taesd CUDA executor without CUDA graphs (TAESD_CUDA_GRAPHS=0)",
    "taesd-unfused": "taesd CUDA executor without the fused cuDNN conv+ReLU kernels",
    "taesd-fp32": "taesd CUDA executor, dtype fp32 (cuDNN TF32)",
    "taesd-bf16": "taesd CUDA executor, dtype bf16",
    "taesd-bounded": "taesd default with max_memory=--bound (tiled within the bound)",
    "taesd-compile": "taesd executor='compile' (torch.compile per part)",
    "plain": "published modules, eager, the device's default dtype (taesd executor='plain')",
    "pipe-taesd": "TaesdVAE in a tiny diffusers StableDiffusionPipeline, pipe.to(device, fp16), "
    "called as pipe.vae.decode / encode",
    "pipe-tiny": "AutoencoderTiny in the same pipeline, pipe.to(device, fp16), eager, pipe.vae.decode / encode",
    "diffusers": "diffusers AutoencoderTiny, eager, fp16 (fp32 on the CPU)",
    "diffusers-compile": "diffusers AutoencoderTiny, fp16, torch.compile(mode=--compile-mode) of "
    "encoder/decoder",
    "diffusers-compile-ro": "diffusers AutoencoderTiny, fp16, torch.compile(mode='reduce-overhead')",
    "diffusers-compile-ma": "diffusers AutoencoderTiny, fp16, torch.compile(mode='max-autotune')",
    "onnxruntime-cuda": "ONNX Runtime CUDAExecutionProvider, fp16 export of the published network",
    "sd-vae": "full SD VAE (diffusers AutoencoderKL, SD 1.5 config, random weights), fp16",
}
COMPILE_MODES = {"diffusers-compile-ro": "reduce-overhead", "diffusers-compile-ma": "max-autotune"}
COMPILING = {"diffusers-compile", "taesd-compile", *COMPILE_MODES}  # their first call per shape compiles
# name -> (sub-pixel mode, Triton convs) for cuda_kernels.rewrite
KERNEL_VARIANTS = {
    "taesd-subpixel": ("tconv", False),
    "taesd-subpixel-triton": ("triton", False),
    "taesd-triton": ("triton", True),
}
DEFAULT_COMPETITORS = [
    "taesd",
    "taesd-eager",
    "taesd-unfused",
    "taesd-fp32",
    "taesd-bf16",
    "taesd-bounded",
    "plain",
    "diffusers",
    "diffusers-compile",
    "onnxruntime-cuda",
    "sd-vae",
]
# The issue-19 plan (the default): what its targets are read from, in priority order.
DECODE_SET = [
    "taesd",
    "taesd-subpixel",
    "taesd-subpixel-triton",
    "taesd-triton",
    "diffusers",
    "diffusers-compile-ro",
    "diffusers-compile-ma",
    "pipe-taesd",
    "pipe-tiny",
    "plain",
]
ENCODE_SET = ["taesd", "taesd-triton", "diffusers", "diffusers-compile-ro", "diffusers-compile-ma",
              "pipe-taesd", "pipe-tiny"]
BOUNDED_SET = ["taesd-bounded", "taesd", "diffusers"]
EXTRA_SET = ["taesd-eager", "taesd-bf16", "taesd-fp32", "taesd-compile"]
SMOKE_COMPETITORS = ["taesd", "taesd-eager", "taesd-bounded", "plain", "diffusers", "sd-vae"]
# Vendor datasheet leads (bandwidth TB/s, dense fp16 tensor TFLOP/s), most specific name first.
KNOWN_GPUS = [
    ("H200", 4.8, 989),
    ("GH200", 4.0, 989),
    ("H100 NVL", 3.9, 835),
    ("H100 PCIe", 2.0, 756),
    ("H100", 3.35, 989),
    ("B200", 8.0, 2250),
    ("A100-SXM4-80GB", 2.039, 312),
    ("A100 80GB PCIe", 1.935, 312),
    ("A100", 1.555, 312),
    ("L40S", 0.864, 362),
    ("L40", 0.864, 181),
    ("L4", 0.3, 121),
    ("A10G", 0.6, 70),
    ("A10", 0.6, 125),
    ("RTX 6000 Ada", 0.96, 364),
    ("RTX A6000", 0.768, 155),
    ("RTX 4090", 1.008, 165),
    ("RTX 3090", 0.936, 71),
    ("V100", 0.9, 125),
    ("T4", 0.32, 65),
]


# ---------------------------------------------------------------- work counts


def network_gflop(op: str, size: int, batch: int) -> float:
    """2 x multiply-adds of the published network's convolutions, from its layer list (141.4 GFLOP per
    512² decode, 122.3 per encode)."""
    import speed

    return speed.network_gflop(op, size, batch)


def traffic_bytes(op: str, size: int, batch: int, esize: int) -> float:
    """The memory-traffic floor of a pass in bytes (``_traffic_elements`` scaled by area)."""
    small, total = _traffic_elements(op)
    return total * esize * batch * (size / small) ** 2


@functools.lru_cache(maxsize=None)
def _traffic_elements(op: str) -> "tuple[int, int]":
    """The memory-traffic floor of a layer-by-layer pass: every convolution reads its input and writes
    its output once, a block's residual is read once more, pointwise ops are fused, and a conv after
    an upsample reads the small map (upsampled on the fly). Counted at 64² and scaled by area."""
    from taesd.model import create
    from taesd.nn.layers import Block

    module = getattr(create(VARIANT), op + "r")
    small = 64
    x = torch.zeros(1, 4, small // 8, small // 8) if op == "decode" else torch.zeros(1, 3, small, small)
    total = 0
    after_upsample: set[int] = set()
    layers = list(module)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d) and i and isinstance(layers[i - 1], nn.Upsample):
            after_upsample.add(id(layer))

    def conv_hook(conv, inputs, out):
        nonlocal total
        total += inputs[0].numel() // (4 if id(conv) in after_upsample else 1) + out.numel()

    def block_hook(block, inputs, out):
        nonlocal total
        total += inputs[0].numel()

    handles = [m.register_forward_hook(conv_hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(block_hook) for m in module.modules() if isinstance(m, Block)]
    with torch.inference_mode():
        module(x)
    for h in handles:
        h.remove()
    return small, total


def known_gpu(name: str) -> "tuple[str, float, float] | None":
    for key, tbps, tflops in KNOWN_GPUS:
        if key.lower() in name.lower():
            return key, tbps, tflops
    return None


# ---------------------------------------------------------------- worker side


def device_dtype(name: str, device: str) -> torch.dtype:
    """The dtype competitor ``name`` runs in on ``device``: its users' default there."""
    if name == "taesd-fp32":
        return torch.float32
    if name == "taesd-bf16":
        return torch.bfloat16
    if device == "cuda" and torch.cuda.get_device_capability() < (7, 0):
        return torch.float32  # no tensor cores: taesd's default is fp32 there
    return torch.float16 if device == "cuda" else torch.float32


def build_runner(name: str, op: str, device: str, args: dict):
    """A function x -> output doing one encode/decode the way ``name``'s users call it, and the
    memory estimate of taesd's planner for it (None for the others)."""
    dtype = device_dtype(name, device)
    if name.startswith("taesd") or name == "plain":
        return _ours(name, op, device, dtype, args)
    if name.startswith("pipe-"):
        return _pipeline_runner(name, op, device, dtype)
    if name.startswith("diffusers"):
        from diffusers import AutoencoderTiny

        vae = AutoencoderTiny().eval().to(device=device, dtype=dtype)
        if name in COMPILING:
            mode = COMPILE_MODES.get(name, args.get("compile_mode")) or None
            part = "decoder" if op == "decode" else "encoder"  # only the part this op runs compiles
            setattr(vae, part, torch.compile(getattr(vae, part), mode=mode, dynamic=False))
        if op == "decode":
            return lambda z: vae.decode(z).sample
        return lambda x: vae.encode(x * 2 - 1).latents
    if name == "sd-vae":
        from diffusers import AutoencoderKL

        vae = (
            AutoencoderKL(
                in_channels=3,
                out_channels=3,
                latent_channels=4,
                layers_per_block=2,
                sample_size=512,
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
            )
            .eval()
            .to(device=device, dtype=dtype)
        )
        if op == "decode":
            return lambda z: vae.decode(z).sample
        return lambda x: vae.encode(x * 2 - 1).latent_dist.mode()
    if name == "onnxruntime-cuda":
        return _onnx_runner(op, device, dtype)
    raise ValueError(f"unknown competitor {name!r}")


def _kernels():
    """taesd's cuda_kernels module wherever this checkout keeps it."""
    import importlib

    for name in ("taesd.runtime.executors.cuda_kernels", "taesd.runtime.cuda_kernels"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise RuntimeError("this checkout has no taesd cuda_kernels module")


def fresh_weights() -> str:
    """A folder with fresh (seed 0) weights of the base variant, so every taesd path goes through
    the public ``taesd.load``."""
    import tempfile

    from taesd.model import create

    folder = tempfile.mkdtemp(prefix="taesd-gpu-bench-w-")
    model = create(VARIANT, seed=0)
    for part in model.parts:
        torch.save(model.part(part).state_dict(), os.path.join(folder, f"{VARIANT}_{part}.pth"))
    return folder


def _make_cuda(model, **kw):
    """The CUDA executor's transform, wherever this checkout keeps it (internal API: eager/unfused rows)."""
    import importlib

    for name in ("taesd.runtime.executors.cuda", "taesd.runtime.cuda"):
        try:
            return importlib.import_module(name).make_cuda(model, **kw)
        except (ImportError, AttributeError):
            continue
    raise RuntimeError("this checkout has no make_cuda")


def _ours(name: str, op: str, device: str, dtype: torch.dtype, args: dict):
    import taesd

    executor = {"plain": "plain", "taesd-compile": "compile", "taesd-unfused": "plain"}.get(name)
    model = taesd.load(VARIANT, fresh_weights(), device=device, dtype=dtype, executor=executor)
    if name == "taesd-unfused":
        model = _make_cuda(model, fuse=False)
    if name in KERNEL_VARIANTS:
        subpixel, convs = KERNEL_VARIANTS[name]
        kernels = _kernels()
        kernels.rewrite(model.part(op + "r"), subpixel=subpixel, triton_convs=convs)
    kw = {"max_memory": args["bound"]} if name == "taesd-bounded" else {}
    return (lambda z: model.decode(z, **kw)) if op == "decode" else (lambda x: model.encode(x, **kw))


def _pipeline_runner(name: str, op: str, device: str, dtype: torch.dtype):
    """A tiny real StableDiffusionPipeline (tests/pipeline_configs.py, built offline) whose VAE is
    TaesdVAE (use_taesd_vae) or AutoencoderTiny, moved the way users move one: pipe.to(device, dtype)."""
    import tempfile

    sys.path.insert(0, str(HERE.parent / "tests"))
    import pipeline_configs

    pipe = pipeline_configs.sd15(Path(tempfile.mkdtemp(prefix="taesd-gpu-pipe-")))
    if name == "pipe-taesd":
        import taesd
        from taesd.integrations.diffusers.vae import use_taesd_vae

        use_taesd_vae(pipe, taesd.load(VARIANT, fresh_weights(), device="cpu", dtype="fp32"))
    else:
        from diffusers import AutoencoderTiny

        pipe.vae = AutoencoderTiny().eval().requires_grad_(False)
    pipe.to(device, dtype)
    vae = pipe.vae
    if op == "decode":
        return lambda z: vae.decode(z).sample
    return lambda x: vae.encode(x * 2 - 1).latents


def _onnx_runner(op: str, device: str, dtype: torch.dtype):
    """Export the plain published module (fp16 on CUDA), run it with ORT's CUDA provider (CPU
    provider on the CPU), inputs and outputs bound on the device (I/O binding, no host copies)."""
    import tempfile

    import onnxruntime as ort

    from taesd.model import create

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        raise RuntimeError(
            f"onnxruntime {ort.__version__} has no {provider} (providers: "
            f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu"
        )
    module = getattr(create(VARIANT, seed=0), op + "r").to(dtype=dtype)
    path = os.path.join(tempfile.mkdtemp(prefix="taesd-gpu-bench-"), f"{op}.onnx")
    dims = {0: "n", 2: "h", 3: "w"}
    example = torch.zeros(1, 4, 8, 8) if op == "decode" else torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example.to(dtype),),
            path,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": dims, "y": dims},
            dynamo=False,
        )
    session = ort.InferenceSession(path, providers=[provider])

    def run(x):
        import numpy as np

        x = x.contiguous()
        binding = session.io_binding()
        binding.bind_input(
            "x",
            device,
            0,
            np.float16 if x.dtype == torch.float16 else np.float32,
            tuple(x.shape),
            x.data_ptr(),
        )
        binding.bind_output("y", device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    return run


def make_input(op: str, size: int, batch: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    shape = (batch, 4, size // 8, size // 8) if op == "decode" else (batch, 3, size, size)
    x = torch.randn(shape, generator=gen) if op == "decode" else torch.rand(shape, generator=gen)
    return x.to(device=device, dtype=dtype)


class Timer:
    """Seconds of one call: CUDA events around it on a GPU, perf_counter on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class WorkerState:
    def __init__(self, name: str, device: str, args: dict):
        self.name, self.device, self.args = name, device, args
        self.runners: dict = {}
        self.call = None
        self.timer = Timer(device)
        self.base = 0

    def setup(self, op: str, size: int, batch: int, warmup: int) -> dict:
        self.call = None
        if self.device == "cuda":
            torch.cuda.empty_cache()
        if op not in self.runners:
            self.runners[op] = build_runner(self.name, op, self.device, self.args)
        x = make_input(op, size, batch, self.device, device_dtype(self.name, self.device))
        runner = self.runners[op]
        self.call = lambda: runner(x)
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss()
        for _ in range(warmup):
            self.call()
        return {"ok": True}

    def calls(self, n: int) -> dict:
        with torch.inference_mode():
            return {"t": [self.timer(self.call) for _ in range(n)]}

    def syncs(self) -> dict:
        return count_syncs(self.call, self.device)

    def peak(self) -> dict:
        if self.device == "cuda":
            return {"peak_mib": (torch.cuda.max_memory_allocated() - self.base) / 2**20}
        return {"peak_mib": (_rss() - self.base) / 2**20}


# Tensor methods that make the host wait for the device when the tensor is on a GPU.
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def count_syncs(fn, device: str) -> dict:
    """Host syncs of one call of ``fn``: on CUDA, the synchronizing operations PyTorch's sync debug
    mode reports (item, nonzero, device-to-host copies, ...) plus explicit ``synchronize`` calls;
    everywhere, the Python-level calls of SYNC_METHODS on tensors of ``device`` (on the CPU that is
    what the same code would sync on a GPU)."""
    import warnings

    counts = {"py": 0, "sync_calls": 0, "cuda": 0}
    originals = {}

    def counted(name, orig):
        def wrapper(self, *a, **k):
            if isinstance(self, torch.Tensor) and self.device.type == device:
                counts["py"] += 1
            return orig(self, *a, **k)

        return wrapper

    for name in SYNC_METHODS:
        originals[name] = torch.Tensor.__dict__.get(name)
        setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    sync = torch.cuda.synchronize

    def counted_sync(*a, **k):
        counts["sync_calls"] += 1
        return sync(*a, **k)

    torch.cuda.synchronize = counted_sync
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
        counts["cuda"] = sum("synchroniz" in str(w.message) for w in caught)
    finally:
        torch.cuda.synchronize = sync
        for name, orig in originals.items():
            if orig is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, orig)
    counts["sync_calls"] -= 1 if device == "cuda" else 0  # the one above, before the call
    counts["total"] = counts["cuda"] + counts["sync_calls"] if device == "cuda" else counts["py"]
    return counts


def probe(device: str, small: bool) -> dict:
    """The achievable ceilings: a device-to-device copy (bytes read + written per second) and an
    fp16 matrix product (fp32 on the CPU), each the best of several timed runs."""
    timer = Timer(device)
    n = (1 << 24) if small else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = min(timer(lambda: dst.copy_(src)) for _ in range(10))
    k = 512 if small else 8192
    dtype = torch.float16 if device == "cuda" else torch.float32
    a = torch.randn(k, k, device=device, dtype=dtype)
    b = torch.randn(k, k, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    mm_s = min(timer(lambda: a @ b) for _ in range(10))
    return {
        "copy_tbps": 2 * n / copy_s / 1e12,
        "matmul_tflops": 2 * k**3 / mm_s / 1e12,
        "matmul_dtype": str(dtype).removeprefix("torch."),
    }


def worker(name: str, device: str, args: dict) -> None:
    """Serve JSON-line requests on stdin: setup, calls, peak, probe, quit. Errors are replies."""
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    state = WorkerState(name, device, args)
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req.pop("cmd")
        if cmd == "quit":
            return
        try:
            with torch.inference_mode():
                reply = {
                    "setup": lambda: state.setup(**req),
                    "calls": lambda: state.calls(**req),
                    "peak": state.peak,
                    "syncs": state.syncs,
                    "probe": lambda: probe(device, **req),
                }[cmd]()
        except Exception as e:  # noqa: BLE001 - a competitor that fails is a row, not a crash
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            reply = {"error": f"{type(e).__name__}: {msg}"[:300]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ---------------------------------------------------------------- driver side


class Worker:
    """One competitor's process; a dead one answers every request with an error."""

    def __init__(self, name: str, device: str, wargs: dict):
        self.name = name
        env = dict(os.environ)
        env["PYTHONPATH"] = str(HERE.parent / "src") + os.pathsep + env.get("PYTHONPATH", "")
        if name == "taesd-eager":
            env["TAESD_CUDA_GRAPHS"] = "0"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "worker",
                name,
                "--device",
                device,
                "--worker-args",
                json.dumps(wargs),
            ],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.dead: str | None = None

    def send(self, **req) -> None:
        if self.dead:
            return
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except OSError:
            self.dead = f"worker {self.name} died (exit {self.proc.poll()}; see its messages above)"

    def receive(self) -> dict:
        line = "" if self.dead else self.proc.stdout.readline()
        if not line:
            self.dead = (
                self.dead or f"worker {self.name} died (exit {self.proc.poll()}; see its messages above)"
            )
            return {"error": self.dead}
        return json.loads(line)

    def ask(self, **req) -> dict:
        self.send(**req)
        return self.receive()

    def close(self) -> None:
        self.send(cmd="quit")
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


@dataclass
class Row:
    op: str
    size: int
    batch: int
    name: str
    dtype: str = ""
    times: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    estimate_mib: float | None = None
    error: str | None = None
    syncs: int | None = None  # host syncs in one call (count_syncs)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def plan_configs(args) -> list[tuple[str, int, int, list[str]]]:
    """(op, size, batch, competitors) in priority order: the 512² decode first (the issue's targets),
    then encode, then the bigger sizes; competitors filtered by their size limits."""
    if args.plan == "issue19":
        return issue_plan(args)
    out = []
    for size in sorted(args.sizes):
        for op in sorted(args.ops, key=lambda o: o != "decode"):
            for batch in args.batches:
                names = [n for n in args.competitors if _runs(n, size, batch, args)]
                out.append((op, size, batch, names))
    return out


def plan_sizes(args) -> tuple[int, int, int]:
    """(the size, the big size, the big batch) of the issue-19 plan: 512², 1024², 16 (--small: 32², 64², 2)."""
    return (32, 64, 2) if args.small else (512, 1024, 16)


def issue_plan(args) -> list[tuple[str, int, int, list[str]]]:
    """The issue-19 plan: 512² decode and encode at batch 1 and 16 against diffusers eager, compiled
    (reduce-overhead, max-autotune) and the pipeline drop-in; then batch-16 1024² encode within the
    memory bound against untiled eager diffusers; then the other taesd paths. ``--competitors``
    filters; ``--precompiled`` (from ``precompile``) limits the compile rows to warmed shapes."""
    size, big, batch = plan_sizes(args)
    plan = [
        ("decode", size, 1, DECODE_SET),
        ("decode", size, batch, DECODE_SET),
        ("encode", size, 1, ENCODE_SET),
        ("encode", size, batch, ENCODE_SET),
        ("encode", big, batch, BOUNDED_SET),
        ("decode", size, 1, EXTRA_SET),
    ]
    warmed = None
    if args.precompiled:
        done = json.loads(Path(args.precompiled).read_text()) if Path(args.precompiled).exists() else []
        warmed = {tuple(d) for d in done}
    out = []
    for op, sz, b, names in plan:
        keep = [n for n in names if args.competitors is None or n in args.competitors]
        if warmed is not None:
            keep = [n for n in keep if n not in COMPILING or (n, op, sz, b) in warmed]
        if keep:
            out.append((op, sz, b, keep))
    return out


def _runs(name: str, size: int, batch: int, args) -> bool:
    if name == "sd-vae":
        return size <= args.sd_vae_max_size and batch <= args.sd_vae_max_batch
    if name in COMPILING:
        return size in args.compile_sizes
    if name == "taesd-bounded":
        return batch > 1 and size == max(args.sizes)
    return True


def planner_estimate_mib(name: str, op: str, size: int, batch: int, device: str, bound) -> float | None:
    """taesd's own estimate of a pass's peak activation memory (the tiling planner's, at the run's
    element size): what its memory bound is stated with."""
    if not (name.startswith("taesd") or name == "plain"):
        return None
    from taesd import tiling
    from taesd.model import create

    model = create(VARIANT)
    part = op + "r"
    an = tiling.analyse(model, part)
    h = size // 8
    esize = torch.tensor([], dtype=device_dtype(name, device)).element_size()
    pass_ = tiling.Pass(batch, h, h, esize, an.layers[-1].out_channels, tiling.memory_overhead(model, an))
    p = tiling.plan(an, pass_, max_memory=bound if name == "taesd-bounded" else None)
    return p.estimate / 2**20


def run_config(workers: dict, op: str, size: int, batch: int, names: list[str], args, progress) -> list[Row]:
    """Set every competitor up (slow compiles in the background), then ``rounds`` turns of
    ``per_turn`` calls each, then the peak memory."""
    rows = {
        n: Row(
            op,
            size,
            batch,
            n,
            str(device_dtype(n, args.device)).removeprefix("torch."),
            estimate_mib=planner_estimate_mib(n, op, size, batch, args.device, args.bound),
        )
        for n in names
    }
    setup = dict(cmd="setup", op=op, size=size, batch=batch, warmup=args.warmup)
    slow = [n for n in names if n in COMPILING or "triton" in n]  # set up in parallel: they compile
    for n in slow:
        workers[n].send(**setup)
    replies = {n: workers[n].ask(**setup) for n in names if n not in slow}
    replies.update({n: workers[n].receive() for n in slow})
    log("  set up: " + ", ".join(f"{n} {'FAILED' if 'error' in replies[n] else 'ok'}" for n in names))
    live = [n for n in names if "error" not in replies[n]]
    for n in names:
        rows[n].error = replies[n].get("error")
    for _ in range(args.rounds):
        for n in live:
            reply = workers[n].ask(cmd="calls", n=args.per_turn)
            if "error" in reply:
                rows[n].error = rows[n].error or reply["error"]
            else:
                rows[n].times += reply["t"]
            progress()
    for n in live:
        rows[n].peak_mib = workers[n].ask(cmd="peak").get("peak_mib")
        syncs = workers[n].ask(cmd="syncs")
        rows[n].syncs = syncs.get("total")
        if not rows[n].times:
            rows[n].error = rows[n].error or "no timed call succeeded"
    return [rows[n] for n in names]


def machine_facts(device: str, probes: dict) -> dict:
    facts = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        **probes,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        facts.update(
            gpu=props.name,
            memory_gib=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
        try:
            facts["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            facts["driver"] = "?"
    else:
        facts["gpu"] = f"none: CPU run ({platform.processor() or platform.machine()})"
    known = known_gpu(facts["gpu"])
    facts["datasheet"] = known
    # The ceilings rates are compared with: datasheet leads where the GPU is known, else the probes.
    facts["peak_tbps"] = known[1] if known else probes["copy_tbps"]
    facts["peak_tflops"] = known[2] if known else probes["matmul_tflops"]
    facts["peak_source"] = f"datasheet ({known[0]})" if known else "measured probes (no datasheet entry)"
    return facts


# ---------------------------------------------------------------- the table and the report


def _compiled_ref(names) -> str:
    """The compiled diffusers row ratios are taken against: max-autotune where it ran."""
    for n in ("diffusers-compile-ma", "diffusers-compile", "diffusers-compile-ro"):
        if n in names:
            return n
    return "diffusers-compile-ma"


def speed_table(rows: list[Row], facts: dict) -> str:
    """Markdown: per configuration every competitor's median (min-max) ms, per image, ratios, the
    achieved fraction of tensor throughput and memory bandwidth, host syncs and peak memory."""
    head = (
        "| op | size | batch | path | dtype | median ms (min-max) | ms/image | images/s | x vs diffusers "
        "| x vs compiled | TFLOP/s | % tensor peak | floor-traffic TB/s | % bandwidth | x floor time "
        "| host syncs/call | peak MiB | planner MiB |"
    )
    lines = [head, "|" + " --- |" * 18]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.op, r.size, r.batch), []).append(r)
    for (op, size, batch), group in groups.items():
        ref = {r.name: r.median for r in group if r.times}
        compiled = _compiled_ref(ref)
        flop = network_gflop(op, size, batch) * 1e9
        for r in group:
            if not r.times:
                lines.append(
                    f"| {op} | {size}² | {batch} | {r.name} | {r.dtype} | {_cell(r.error or 'skipped')} "
                    + "| - " * 12
                    + "|"
                )
                continue
            t = r.median
            esize = torch.tensor([], dtype=getattr(torch, r.dtype)).element_size()
            floor = traffic_bytes(op, size, batch, esize)
            vs = lambda other: f"{ref[other] / t:.2f}" if other in ref else "-"  # noqa: E731
            tflops, tbps = flop / t / 1e12, floor / t / 1e12
            floor_time = floor / (facts["copy_tbps"] * 1e12)
            mib = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
            lines.append(
                f"| {op} | {size}² | {batch} | {r.name} | {r.dtype} | {1e3 * t:.3f} "
                f"({1e3 * min(r.times):.3f}-"
                f"{1e3 * max(r.times):.3f}) | {1e3 * t / batch:.3f} | {batch / t:.1f} | {vs('diffusers')} "
                f"| {vs(compiled)} ({compiled.removeprefix('diffusers-')}) | {tflops:.1f} "
                f"| {100 * tflops / facts['peak_tflops']:.1f}% "
                f"| {tbps:.2f} | {100 * tbps / facts['peak_tbps']:.1f}% | {t / floor_time:.1f} "
                f"| {'-' if r.syncs is None else r.syncs} | {mib(r.peak_mib)} | {mib(r.estimate_mib)} |"
            )
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")[:160]


def target_lines(rows: list[Row], facts: dict, sizes: "tuple[int, int, int]" = (512, 1024, 16)) -> list[str]:
    """Issue 19's targets, read off this run's rows (only where both sides ran)."""
    by = {(r.op, r.size, r.batch, r.name): r for r in rows if r.times}
    size, big, b16 = sizes
    lines = []

    def ratio(cfg, ours, other, want, label):
        a, b = by.get((*cfg, ours)), by.get((*cfg, other))
        if a and not b and other == "diffusers-compile-ma" and by.get((*cfg, "diffusers-compile-ro")):
            other, b = "diffusers-compile-ro", by[(*cfg, "diffusers-compile-ro")]  # max-autotune left out
            label += " (max-autotune not run: against reduce-overhead)"
        if a and b:
            x = b.median / a.median
            lines.append(
                f"- {label}: {x:.2f}x ({ours} {1e3 * a.median / cfg[2]:.3f} vs {other} "
                f"{1e3 * b.median / cfg[2]:.3f} ms/image; target >= {want}x): {'met' if x >= want else 'NOT met'}"
            )
        else:
            lines.append(f"- {label}: not measured in this run ({ours} or {other} missing)")

    ratio(("decode", size, 1), "taesd", "diffusers-compile-ma", 2,
          f"batch-1 {size}² decode, taesd vs diffusers + torch.compile(max-autotune)")
    ratio(("encode", size, 1), "taesd", "diffusers-compile-ma", 1.5,
          f"batch-1 {size}² encode, taesd vs diffusers + torch.compile(max-autotune)")
    ratio(("decode", size, b16), "taesd", "diffusers-compile-ma", 1.6,
          f"batch-{b16} {size}² decode, taesd vs diffusers + torch.compile(max-autotune)")
    ours = by.get(("decode", size, b16, "taesd"))
    if ours:
        per = 1e3 * ours.median / b16
        esize = torch.tensor([], dtype=getattr(torch, ours.dtype)).element_size()
        floor = 1e3 * traffic_bytes("decode", size, 1, esize) / (facts["copy_tbps"] * 1e12)
        lines.append(
            f"- batch-{b16} {size}² decode: {per:.3f} ms per image (target <= 0.30 ms on an H200): "
            f"{'met' if per <= 0.30 else 'NOT met'}; memory-traffic floor {floor:.3f} ms per image at the "
            f"measured copy bandwidth ({per / floor:.1f}x above it)"
        )
    ratio(("decode", size, 1), "pipe-taesd", "pipe-tiny", 2,
          f"batch-1 {size}² decode in a pipeline, TaesdVAE vs AutoencoderTiny eager fp16 (pipe.vae.decode)")
    ratio(("encode", big, b16), "taesd-bounded", "diffusers", 1,
          f"batch-{b16} {big}² encode, taesd max_memory bound vs untiled eager diffusers (per image)")
    for cfg in sorted({(r.op, r.size, r.batch) for r in rows if r.times}):
        mine = [r for r in rows if r.times and (r.op, r.size, r.batch) == cfg and r.name in ("taesd",
                *KERNEL_VARIANTS)]
        if len(mine) > 1:
            best = min(mine, key=lambda r: r.median)
            lines.append(
                f"- kernels A/B, {cfg[0]} {cfg[1]}² x{cfg[2]}: fastest {best.name} "
                + ", ".join(f"{r.name} {1e3 * r.median:.3f} ms" for r in sorted(mine, key=lambda r: r.median))
            )
    synced = [f"{r.name} {r.op} x{r.batch}: {r.syncs}" for r in rows if r.syncs and r.name.startswith(
        ("taesd", "pipe-taesd", "plain"))]
    lines.append("- host syncs per call on taesd paths: " + ("; ".join(synced) if synced else "none counted"))
    return lines


def fact_lines(facts: dict) -> list[str]:
    lines = [f"GPU: {facts['gpu']}"]
    if "capability" in facts:
        lines[0] += (
            f", {facts['memory_gib']:.0f} GiB, compute capability {facts['capability']}, "
            f"{facts['sms']} SMs; driver {facts.get('driver')}, CUDA {facts['cuda']}, cuDNN {facts['cudnn']}"
        )
    if facts["datasheet"]:
        name, tbps, tflops = facts["datasheet"]
        lines.append(
            f"datasheet ({name}, vendor leads): {tbps} TB/s memory bandwidth, {tflops} TFLOP/s dense "
            "fp16 tensor"
        )
    lines.append(
        f"measured here: copy {facts['copy_tbps']:.2f} TB/s (bytes read + written), "
        f"{facts['matmul_dtype']} matrix product {facts['matmul_tflops']:.1f} TFLOP/s"
    )
    lines.append(
        f"% tensor peak and % bandwidth are against {facts['peak_source']}: {facts['peak_tflops']:.1f} "
        f"TFLOP/s, {facts['peak_tbps']:.2f} TB/s; 'x floor time' is the time over the traffic floor "
        "moved at the measured copy bandwidth"
    )
    lines.append(
        f"torch {facts['torch']}, Python {facts['python']}, {facts['platform']}, {facts['cpu_count']} CPUs"
    )
    return lines


def write_report(path, rows: list[Row], facts: dict, accuracy: list[str], notes: list[str],
                 extras: "list[str] | None" = None, sizes=(512, 1024, 16)) -> None:
    from taesd.io.files import atomic_path

    text = "\n".join(
        [
            "# TAESD GPU benchmark",
            "",
            "Written by benchmarks/bench_gpu.py (benchmarks/gpu_check.sh runs it with the accuracy "
            "check). Each "
            "competitor runs in its own process; per configuration all are set up and warmed up, "
            "then called in "
            "turns, each call timed with CUDA events (perf_counter on the CPU). The network is the "
            "base TAESD "
            f"({VARIANT}, fresh weights), the same as diffusers' AutoencoderTiny default. TFLOP/s counts the "
            "published network's convolutions (2 x multiply-adds: 141.4 GFLOP per 512² decode, "
            "122.3 per encode); "
            "floor traffic counts each convolution reading its input and writing its output once (residuals "
            "read once more, pointwise ops fused). Peak MiB: max_memory_allocated during the calls "
            "above what the "
            "worker held before (weights, inputs); planner MiB: taesd's tiling estimate for the pass.",
            "",
            "## Machine",
            "",
        ]
        + [f"- {f}" for f in fact_lines(facts)]
        + ["", "## Targets (issue 19)", ""]
        + (target_lines(rows, facts, sizes) or ["- (nothing measured)"])
        + ["", "## Speed", "", speed_table(rows, facts), "", "## Accuracy", ""]
        + accuracy
        + [""]
        + (extras or [])
        + ["", "## Notes", ""]
        + [f"- {n}" for n in notes]
        + [""]
    )
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ---------------------------------------------------------------- accuracy


def photos(size: int) -> torch.Tensor:
    """scikit-image's astronaut, coffee and chelsea: centre square, resized to size x size, in [0, 1]."""
    import numpy as np
    import skimage.data
    import torch.nn.functional as F

    out = []
    for name in ("astronaut", "coffee", "chelsea"):
        arr = getattr(skimage.data, name)()[..., :3]
        h, w = arr.shape[:2]
        s = min(h, w)
        arr = np.ascontiguousarray(arr[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s])
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
        out.append(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(out).clamp(0, 1)


def with_kernels(model, subpixel, convs: bool):
    """``model`` with cuda_kernels.rewrite applied to every part (the kernels A/B paths)."""
    kernels = _kernels()
    for part in model.parts:
        kernels.rewrite(model.part(part), subpixel=subpixel, triton_convs=convs)
    return model


def accuracy_modes(device: str) -> list[tuple[str, object]]:
    """(label, model factory) for every reduced-precision path on ``device``; on the CPU the CUDA
    executor's own code runs eager in fp16 and bf16 (the same modules and fusion fallbacks)."""
    from taesd.loader import load

    def cuda_exec(dtype, **kw):
        return lambda w: _make_cuda(load("taef2", w, device=device, dtype=dtype, executor="plain"), **kw)

    def kernels(dtype, subpixel, convs):
        return lambda w: with_kernels(load("taef2", w, device=device, dtype=dtype), subpixel, convs)

    if device == "cuda":
        return [
            (
                "default (taesd.load on cuda: fp16, CUDA graphs, fused cuDNN)",
                lambda w: load("taef2", w, device="cuda"),
            ),
            ("fp16 eager (no graphs)", cuda_exec("fp16", graphs=False)),
            ("fp16 unfused", cuda_exec("fp16", fuse=False)),
            ("bf16", lambda w: load("taef2", w, device="cuda", dtype="bf16")),
            ("fp32 on request (cuDNN TF32)", lambda w: load("taef2", w, device="cuda", dtype="fp32")),
            ("fp16 + sub-pixel upsample+conv (cuDNN transposed conv)", kernels("fp16", "tconv", False)),
            ("fp16 + sub-pixel upsample+conv (Triton)", kernels("fp16", "triton", False)),
            ("fp16 + all Triton convs and blocks", kernels("fp16", "triton", True)),
            ("bf16 + all Triton convs and blocks", kernels("bf16", "triton", True)),
        ]
    modes = [
        ("CUDA executor code, fp16, on the CPU", cuda_exec("fp16", graphs=False)),
        ("CUDA executor code, bf16, on the CPU", cuda_exec("bf16", graphs=False)),
        ("fp32 + sub-pixel upsample+conv (transposed conv), on the CPU", kernels("fp32", "tconv", False)),
    ]
    return modes  # the Triton kernels on the CPU (interpreter): tests/test_cuda_kernels.py


def _accuracy_of(model, x, z, y, ref) -> tuple[float, float, float, float]:
    """(decode PSNR, encode PSNR, latent max abs diff, replay-vs-first max abs diff) of one path."""
    from taesd.evaluation.metrics import psnr

    outs = [model.decode(z.to(model.device)).float().cpu() for _ in range(3)]
    zz = model.encode(x.to(model.device)).float().cpu()
    for _ in range(2):
        model.encode(x.to(model.device))
    dec = psnr(outs[-1], y).min().item()
    enc = psnr(ref.decode(zz), y).min().item()
    return dec, enc, (zz - z).abs().max().item(), (outs[-1] - outs[0]).abs().max().item()


def accuracy(args) -> int:
    """PSNR of every reduced-precision path against the fp32 network (plain modules on the CPU) on
    the taef2 weights and three photos; writes a markdown fragment; exit 1 when one is under the bar."""
    from taesd.errors import TaesdError
    from taesd.loader import load

    if not args.weights:
        raise TaesdError("the accuracy check needs the taef2 weights: --weights DIR or $TAESD_WEIGHTS")
    x = photos(args.size)
    ref = load("taef2", args.weights, device="cpu", dtype="fp32", executor="plain")
    z = ref.encode(x)
    y = ref.decode(z)
    lines = [
        f"taef2 published weights, photos astronaut, coffee, chelsea at {args.size}², against the fp32 "
        f"network (plain modules on the CPU); bar {args.min_psnr} dB. Encode: PSNR of the fp32 decode of "
        "the path's latents. The decode runs 3 times (eager, captured, replayed where graphs are on); "
        "'replay vs first' is the max abs difference between the first and the last call.",
        "",
        "| path | decode PSNR dB (min over photos) | encode PSNR dB | latent max abs diff | replay "
        "vs first | ok |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    ok = True
    for label, factory in accuracy_modes(args.device):
        log(f"accuracy: {label}")
        try:
            dec, enc, zdiff, replay = _accuracy_of(factory(args.weights), x, z, y, ref)
        except Exception as e:  # noqa: BLE001 - a path that fails is a row, not a crash
            ok = False
            lines.append(f"| {label} | {_cell(f'{type(e).__name__}: {e}')} | - | - | - | NO |")
            continue
        good = min(dec, enc) >= args.min_psnr
        ok &= good
        lines.append(
            f"| {label} | {dec:.1f} | {enc:.1f} | {zdiff:.1e} | {replay:.1e} | {'yes' if good else 'NO'} |"
        )
        if args.output:  # what is measured so far survives a time limit
            Path(args.output).write_text("\n".join(lines + ["", "Accuracy check: incomplete."]) + "\n")
    lines += ["", f"Accuracy check: {'passed' if ok else 'FAILED'} (every path >= {args.min_psnr} dB)."]
    print("\n".join(lines))
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")
    return 0 if ok else 1


# ---------------------------------------------------------------- compile warm-up and the NaN check


def precompile(args) -> int:
    """Warm torch.compile's on-disk caches (inductor's FX-graph, autotuning and Triton caches) for
    the compiled diffusers rows while other sections run: one worker per (mode, op), in parallel,
    each setting up the same shapes the bench will (so the bench's own compile is a cache hit).
    Writes the (name, op, size, batch) that finished to ``-o`` as JSON after each one."""
    import threading

    size, _big, b16 = plan_sizes(args)
    started = time.time()
    done: list = []
    lock = threading.Lock()
    jobs = {(n, op): (1, b16) for n in args.names for op in args.ops if n in COMPILE_MODES}
    if "taesd-compile" in args.names:
        jobs[("taesd-compile", "decode")] = (1,)  # the bench runs it at batch-1 decode only
    workers = {k: Worker(k[0], args.device, {"compile_mode": ""}) for k in jobs}

    def run(key):
        name, op = key
        for batch in jobs[key]:
            if time.time() - started > args.budget_s:
                return
            t = time.time()
            reply = workers[key].ask(cmd="setup", op=op, size=size, batch=batch, warmup=3)
            log(f"precompile {name} {op} x{batch}: {reply.get('error', 'ok')} in {time.time() - t:.0f} s")
            if "error" not in reply:
                with lock:
                    done.append([name, op, size, batch])
                    Path(args.output).write_text(json.dumps(done))

    Path(args.output).write_text("[]")
    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, args.budget_s + 60 - (time.time() - started)))
    for w in workers.values():
        w.proc.kill()  # a compile still running past the budget is not waited for
    log(f"precompile: {len(done)} shapes warmed in {time.time() - started:.0f} s")
    return 0


def nan_check(args) -> int:
    """Bad input on the device still ends in the one-line TaesdError: a NaN latent to decode and an
    image far outside [0, 1] to encode, on a cold shape and on a warm (captured) one; where the
    error comes (the bad call, the next sync, the next call) and whether good input works after."""
    import taesd
    from taesd.errors import TaesdError

    size = 32 if args.device == "cpu" else 512
    model = taesd.load(VARIANT, fresh_weights(), device=args.device)
    good = {"decode": make_input("decode", size, 1, args.device, model.dtype),
            "encode": make_input("encode", size, 1, args.device, model.dtype)}
    bad = {"decode": good["decode"].clone(), "encode": good["encode"].clone()}
    bad["decode"][0, 0, 3, 3] = float("nan")
    bad["encode"][0, 0, 3, 3] = 40.0
    lines = ["## Bad input on the device", "",
             "| op | shape state | error at | message | one line | good input after |", "| --- " * 6 + "|"]
    ok = True
    for op in ("decode", "encode"):
        fn = getattr(model, op)
        for state in ("cold", "warm"):
            if state == "warm":
                for _ in range(3):
                    fn(good[op])
            where, msg = "never", ""
            steps = [("the bad call", lambda: fn(bad[op])), ("the next sync", lambda: _sync(args.device)),
                     ("the next call", lambda: fn(good[op]))]
            for label, step in steps:
                try:
                    step()
                except TaesdError as e:
                    where, msg = label, str(e)
                    break
                except Exception as e:  # noqa: BLE001 - any other error is reported as such
                    where, msg = label + f" ({type(e).__name__}, not TaesdError)", str(e)
                    break
            try:
                fine = bool(torch.isfinite(fn(good[op]).float()).all().item())
            except Exception as e:  # noqa: BLE001
                fine = f"no: {type(e).__name__}"
            one_line = bool(msg) and "\n" not in msg.strip()
            ok &= where != "never" and one_line and fine is True
            lines.append(f"| {op} | {state} | {where} | {_cell(msg)} | {one_line} | {fine} |")
    lines += ["", f"Bad-input check: {'passed' if ok else 'FAILED'}."]
    print("\n".join(lines))
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")
    return 0 if ok else 1


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- command line


def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_gpu.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="GPU speed benchmark of taesd against diffusers (eager and compiled), ONNX "
                    "Runtime CUDA and "
        "the full SD VAE; writes benchmarks/GPU.md. Competitors: "
        + "; ".join(f"{k}: {v}" for k, v in COMPETITORS.items()),
        epilog="examples:\n  python benchmarks/bench_gpu.py --budget-s 300\n"
        "  python benchmarks/bench_gpu.py --device cpu --sizes 64 --batches 1 2 -o /tmp/GPU.md\n"
        "  python benchmarks/bench_gpu.py accuracy --weights /path/to/weights",
    )
    p.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--ops", nargs="+", choices=["decode", "encode"], default=["decode", "encode"])
    p.add_argument("--sizes", nargs="+", type=int, default=[512, 1024], help="image sides in pixels")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument(
        "--competitors",
        nargs="+",
        choices=list(COMPETITORS),
        help="default: all on cuda; a small set on the cpu",
    )
    p.add_argument("--rounds", type=int, default=5, help="turns over the competitors per configuration")
    p.add_argument("--per-turn", type=int, default=4, help="timed calls per competitor per turn")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed calls first (graphs are captured on the 2nd)"
    )
    p.add_argument("--sd-vae-max-size", type=int, default=1024)
    p.add_argument("--sd-vae-max-batch", type=int, default=1)
    p.add_argument(
        "--compile-sizes",
        nargs="*",
        type=int,
        default=[512],
        help="sizes diffusers-compile runs at (each shape compiles anew)",
    )
    p.add_argument(
        "--compile-mode",
        default="reduce-overhead",
        help="torch.compile mode of diffusers-compile ('' for the default mode)",
    )
    p.add_argument("--bound", default="2GiB", help="max_memory of taesd-bounded (the stated memory bound)")
    p.add_argument(
        "--budget-s", type=float, default=0, help="stop starting configurations after this (0: none)"
    )
    p.add_argument(
        "--config-reserve-s",
        type=float,
        default=15,
        help="start a configuration only with this much of the budget left",
    )
    p.add_argument(
        "--compile-reserve-s",
        type=float,
        default=120,
        help="run diffusers-compile in a configuration only with this much left (it compiles)",
    )
    p.add_argument("--accuracy", help="markdown fragment (from `bench_gpu.py accuracy -o`) to include")
    p.add_argument("--extra", action="append", help="another markdown fragment to include (repeatable)")
    p.add_argument(
        "--plan",
        choices=["issue19", "grid"],
        default="issue19",
        help="issue19: the issue's configurations (default); grid: --ops x --sizes x --batches",
    )
    p.add_argument("--small", action="store_true", help="issue19 plan at 32²/64², batch 2 (CPU smoke)")
    p.add_argument("--precompiled", help="JSON from `bench_gpu.py precompile`: compiled rows only where warmed")
    p.add_argument("-o", "--output", default=str(HERE / "GPU.md"), help="markdown report to write")
    return p


def accuracy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_gpu.py accuracy",
        description="PSNR of every reduced-precision path against the fp32 network",
        epilog="example: python benchmarks/bench_gpu.py accuracy --weights weights/",
    )
    p.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--weights", default=os.environ.get("TAESD_WEIGHTS"), help="folder with taef2 weights")
    p.add_argument("--size", type=int, default=512, help="photo side in pixels")
    p.add_argument("--min-psnr", type=float, default=40.0)
    p.add_argument("-o", "--output", help="write the table (markdown) here too")
    return p


def log(msg: str) -> None:
    """A progress line with the UTC time, to stderr (the logs of gpu_check.sh keep it)."""
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())}] {msg}", file=sys.stderr, flush=True)


def bench(args) -> int:
    from taesd.errors import TaesdError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise TaesdError(
            "--device cuda: no CUDA device is visible to torch; use --device cpu for the smoke run"
        )
    if args.rounds < 1 or args.per_turn < 1:
        raise TaesdError("--rounds and --per-turn must be at least 1")
    if args.competitors is None and args.plan == "grid":
        args.competitors = DEFAULT_COMPETITORS if args.device == "cuda" else SMOKE_COMPETITORS
    started = time.time()
    deadline = started + args.budget_s if args.budget_s else float("inf")
    plan = plan_configs(args)
    sizes = plan_sizes(args)
    wargs = {"bound": args.bound, "compile_mode": args.compile_mode}
    names = list(dict.fromkeys(n for *_, ns in plan for n in ns))
    log(f"bench: {len(plan)} configurations, {len(names)} workers: {' '.join(names)}")
    workers = {n: Worker(n, args.device, wargs) for n in names}  # all start (import) at once
    rows: list[Row] = []
    notes = [
        f"{args.rounds} turns x {args.per_turn} timed calls per competitor after {args.warmup} warm-up "
        f"calls, plan {args.plan}; taesd-bounded: max_memory={args.bound}; host syncs/call: one call "
        "after the timed ones, counted by torch.cuda.set_sync_debug_mode('warn') plus explicit "
        "torch.cuda.synchronize calls (on the CPU: Python-level item/bool/float/int/tolist calls)"
    ]
    accuracy_md = ["(not run)"]
    if args.accuracy and Path(args.accuracy).exists():
        accuracy_md = Path(args.accuracy).read_text().splitlines()
    extras = []
    for path in args.extra or []:
        extras += (Path(path).read_text().splitlines() if Path(path).exists() else [f"(missing: {path})"]) + [""]
    facts = None
    try:
        probes = workers[names[0]].ask(cmd="probe", small=args.device != "cuda")
        if "error" in probes:
            raise TaesdError(f"the bandwidth/matmul probe failed: {probes['error']}")
        facts = machine_facts(args.device, probes)
        log(f"probe: copy {facts['copy_tbps']:.2f} TB/s, matmul {facts['matmul_tflops']:.0f} TFLOP/s")
        for op, size, batch, cfg_names in plan:
            left = deadline - time.time()
            slow = [n for n in cfg_names if n in COMPILING]
            if rows and slow and left < args.compile_reserve_s:
                cfg_names = [n for n in cfg_names if n not in COMPILING]
                notes.append(f"{op} {size}² x{batch}: {', '.join(slow)} left out (time budget)")
            if not cfg_names:
                continue
            if rows and left < args.config_reserve_s:  # the first configuration always runs
                notes.append(f"{op} {size}² x{batch}: not run (time budget of {args.budget_s:.0f} s spent)")
                continue
            log(f"{op} {size}² x{batch}: {' '.join(cfg_names)} ({left:.0f} s of the budget left)")
            new = run_config(workers, op, size, batch, cfg_names, args, lambda: None)
            rows += new
            for r in new:
                what = f"{1e3 * r.median:.3f} ms, syncs {r.syncs}" if r.times else f"FAILED {r.error}"
                log(f"  {r.name}: {what}")
            notes_now = notes + [f"whole run so far: {time.time() - started:.0f} s"]
            write_report(args.output, rows, facts, accuracy_md, notes_now, extras, sizes)
    finally:
        for w in workers.values():
            w.send(cmd="quit")
        for w in workers.values():
            w.close()
    notes.append(f"whole run: {time.time() - started:.0f} s")
    write_report(args.output, rows, facts, accuracy_md, notes, extras, sizes)
    print(speed_table(rows, facts))
    print("\n".join(target_lines(rows, facts, sizes)))
    print(f"wrote {args.output}")
    return 0


def main(argv=None) -> int:
    from taesd.errors import TaesdError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        p = argparse.ArgumentParser(prog="bench_gpu.py worker")
        p.add_argument("name")
        p.add_argument("--device", default="cuda")
        p.add_argument("--worker-args", default="{}")
        a = p.parse_args(argv[1:])
        worker(a.name, a.device, json.loads(a.worker_args))
        return 0
    try:
        if argv[:1] == ["accuracy"]:
            return accuracy(accuracy_parser().parse_args(argv[1:]))
        if argv[:1] in (["precompile"], ["nan"]):
            p = argparse.ArgumentParser(prog=f"bench_gpu.py {argv[0]}")
            p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
            p.add_argument("--names", nargs="+", default=[*COMPILE_MODES, "taesd-compile"], choices=sorted(COMPILING))
            p.add_argument("--ops", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
            p.add_argument("--small", action="store_true", help="32² and batch 2 (CPU smoke)")
            p.add_argument("--budget-s", type=float, default=200)
            p.add_argument("-o", "--output", required=argv[0] == "precompile")
            a = p.parse_args(argv[1:])
            return precompile(a) if argv[0] == "precompile" else nan_check(a)
        return bench(bench_parser().parse_args(argv))
    except TaesdError as e:
        print(f"bench_gpu: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
