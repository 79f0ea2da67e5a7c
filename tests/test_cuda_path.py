"""The CUDA executor (taesd.runtime.executors.cuda) and the GPU benchmark harness.

Everything here runs on the CPU: the dtype/device rules, the graph cache policy with a fake capture,
the memory planner with an injected mem_get_info, the executor's eager code (fp32 exact against the
plain network, fp16/bf16 PSNR against fp32 on the real taef2 weights), and the whole GPU check script
in its CPU smoke mode. The tests marked for CUDA run where a GPU is visible (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import taesd
from conftest import weights_dir
from taesd import tiling
from taesd.loader import load, with_executor
from taesd.runtime.dtypes import default_dtype
from taesd.runtime.executors import cuda, cuda_graphs

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = str(weights_dir())   # $TAESD_WEIGHTS, else ../shared/weights (conftest)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_weights = pytest.mark.skipif(
    not (WEIGHTS and Path(WEIGHTS, "taef2_decoder.pth").is_file()),
    reason="needs the taef2 weights ($TAESD_WEIGHTS)",
)


# ---------------------------------------------------------------- dtype and device rules


def test_default_dtype_rule():
    assert default_dtype("cpu") == torch.float32
    assert default_dtype("cuda", capability=(9, 0)) == torch.float16
    assert default_dtype("cuda", capability=(7, 0)) == torch.float16
    assert default_dtype("cuda", capability=(6, 1)) == torch.float32  # no tensor cores
    assert default_dtype("cuda", "fp32", capability=(9, 0)) == torch.float32
    assert default_dtype("cuda", "bf16", capability=(9, 0)) == torch.bfloat16
    assert default_dtype("cpu", torch.float16) == torch.float16
    with pytest.raises(taesd.TaesdError, match="unknown dtype"):
        default_dtype("cpu", "fp8")


@needs_weights
def test_load_on_cpu_keeps_fp32_and_the_cpu_executor():
    model = load("taef2", WEIGHTS, device="cpu")
    assert model.dtype == torch.float32
    assert type(model.decoder).__name__ == "FastSequential"


def test_with_executor_picks_by_device():
    model = with_executor(taesd.create("taesd", seed=0), "fast")
    assert type(model.decoder).__name__ == "FastSequential"  # CPU: the CPU fast executor
    assert not isinstance(model.decoder, cuda.CudaSequential)


# ---------------------------------------------------------------- graph cache policy (fake capture)


class FakeCapture:
    """Stands in for CUDA graph capture: a static buffer, a recorded call, a replay that reruns."""

    def __init__(self, fail_on=()):
        self.captured, self.replays, self.fail_on = [], 0, fail_on

    def __call__(self, fn, x):
        if tuple(x.shape) in self.fail_on:
            raise RuntimeError("operation not permitted when stream is capturing")
        static = cuda_graphs.static_like(x)
        self.captured.append(tuple(x.shape))

        def replay(y):
            self.replays += 1
            static.copy_(y)
            return fn(static).clone()

        return replay


def _double(x):
    return x * 2


def test_cache_captures_on_repeat_and_replays():
    cap = FakeCapture()
    cache = cuda_graphs.GraphCache(cap, capacity=2, repeats=2)
    x = torch.ones(1, 2, 3, 3)
    assert torch.equal(cache.run("a", x, _double), x * 2) and cap.captured == []  # first sight: eager
    assert torch.equal(cache.run("a", x + 1, _double), (x + 1) * 2)  # second: capture + run
    assert cap.captured == [(1, 2, 3, 3)] and cap.replays == 1
    assert torch.equal(cache.run("a", x + 2, _double), (x + 2) * 2)  # replay, new data
    assert cache.stats.captures == 1 and cache.stats.replays == 1 and cache.stats.eager == 1


def test_cache_lru_eviction():
    cache = cuda_graphs.GraphCache(FakeCapture(), capacity=2, repeats=1)
    x = torch.zeros(1)
    for key in ("a", "b", "a", "c"):  # "b" is least recently used when "c" arrives
        cache.run(key, x, _double)
    assert cache.keys == ["a", "c"] and cache.stats.evictions == 1


def test_cache_memory_budget_and_failures():
    held = []
    cache = cuda_graphs.GraphCache(
        FakeCapture(fail_on={(1, 1)}),
        capacity=8,
        repeats=1,
        nbytes=lambda key, x: x.numel() * 100,
        budget=lambda h: held.append(h) or 250,
    )
    cache.run("small", torch.zeros(2), _double)  # 200 bytes: fits
    assert cache.keys == ["small"] and cache.held_bytes == 200
    cache.run("big", torch.zeros(5), _double)  # 500 bytes: over the budget, eager for good
    assert "big" not in cache.keys and "memory budget" in cache.why_eager("big")
    cache.run("other", torch.zeros(1), _double)  # 200 + 100 > 250: the older graph goes
    assert cache.keys == ["other"] and cache.stats.evictions == 1 and held[-1] == 200
    out = cache.run("bad", torch.ones(1, 1), _double)  # capture refused: eager, remembered
    assert torch.equal(out, torch.full((1, 1), 2.0)) and "capture failed" in cache.why_eager("bad")
    assert cache.stats.failures == 1


def test_graph_memory_reads_injected_mem_get_info():
    gib = 2**30
    memory = cuda_graphs.GraphMemory("cuda", mem_get_info=lambda d: (8 * gib, 80 * gib))
    assert memory.budget() == 2 * gib  # a quarter of free
    assert memory.budget(held=4 * gib) == 3 * gib  # what graphs hold can be given back
    assert cuda_graphs.GraphMemory("cuda", lambda d: (100 * gib, 141 * gib)).budget() == cuda_graphs.GRAPH_MEMORY_CAP


def test_model_with_fake_capture_replays_repeated_shapes():
    ref = taesd.create("taesd", seed=0)
    cap = FakeCapture()
    model = cuda.make_cuda(copy.deepcopy(ref), capture=cap, mem_get_info=lambda d: (2**34, 2**34))
    z = torch.randn(1, 4, 8, 8)
    outs = [model.decode(z) for _ in range(3)]
    assert cap.captured == [(1, 4, 8, 8)]
    cache = cuda.graph_cache(model, "decoder")
    assert cache.stats.eager == 1 and cache.stats.captures == 1 and cache.stats.replays == 1
    for out in outs:
        torch.testing.assert_close(out, ref.decode(z), atol=1e-5, rtol=1e-5)
        assert out.is_contiguous()
    model.decode(torch.randn(2, 4, 8, 8))  # a new shape runs eager first
    assert cap.captured == [(1, 4, 8, 8)]
    with torch.no_grad():  # outside inference mode: the modules, never a graph
        model.decoder(z)
    assert cache.stats.replays == 1


# ---------------------------------------------------------------- the executor's eager code on the CPU


def test_cuda_executor_fp32_matches_plain_and_keeps_state_dict():
    ref = taesd.create("taef2", seed=1)
    model = cuda.make_cuda(copy.deepcopy(ref), graphs=False)
    assert list(model.state_dict()) == list(ref.state_dict())
    z, x = torch.randn(2, 32, 8, 8), torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(model.decode(z), ref.decode(z), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.encode(x), ref.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.decode(z, tile_size=4), ref.decode(z), atol=1e-5, rtol=1e-5)  # tiling
    cuda.make_plain(model)
    assert type(model.decoder) is torch.nn.Sequential
    assert not any(isinstance(m, (cuda.CudaBlock, cuda.CudaClamp)) for m in model.modules())


def test_cuda_block_autograd_gets_plain_forward():
    model = cuda.make_cuda(taesd.create("taesd", seed=0), graphs=False).train().requires_grad_(True)
    x = torch.rand(1, 3, 32, 32)
    model(x).mean().backward()
    assert model.encoder[0].weight.grad is not None


def test_fusion_probe_is_off_on_the_cpu():
    assert not cuda.fusion_available(torch.zeros(1, 8, 4, 4))


def test_memory_estimate_uses_the_run_dtype():
    model = taesd.create("taesd")
    an = tiling.analyse(model, "decoder")
    an_overhead = tiling.memory_overhead(model, an)
    fp32 = tiling.estimate_peak(an, tiling.Pass(16, 128, 128, 4, 3, an_overhead))
    fp16 = tiling.estimate_peak(an, tiling.Pass(16, 128, 128, 2, 3, an_overhead))
    assert abs(fp16 * 2 - fp32) <= 2
    est = cuda.graph_bytes(model, "decoder")(None, torch.zeros(16, 4, 128, 128, dtype=torch.float16))
    assert est == fp16
    # The stated bound: batch 16 at 1024² in fp16, untiled ~9 GiB; with max_memory the plan stays under it.
    assert 8 * 2**30 < fp16 < 10 * 2**30
    p = tiling.plan(an, tiling.Pass(16, 128, 128, 2, 3, an_overhead), max_memory="2GiB")
    assert p.tiled and p.estimate <= 2 * 2**30


@needs_weights
def test_reduced_precision_psnr_on_real_photos():
    """The accuracy check of gpu_check.sh, run by the CUDA executor's code on the CPU."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gpu
    from taesd.evaluation.metrics import psnr

    x = bench_gpu.photos(48)
    ref = load("taef2", WEIGHTS, device="cpu", dtype="fp32", executor="plain")
    z = ref.encode(x)
    y = ref.decode(z)
    for dtype in ("fp16", "bf16"):
        model = cuda.make_cuda(
            load("taef2", WEIGHTS, device="cpu", dtype=dtype, executor="plain"), graphs=False
        )
        assert psnr(model.decode(z).float(), y).min() >= 40
        assert psnr(ref.decode(model.encode(x).float()), y).min() >= 40


# ---------------------------------------------------------------- on a GPU (gpu_check.sh runs these)


@needs_cuda
def test_load_on_cuda_defaults_to_fp16_graphs_and_matches_eager():
    model = taesd.create("taesd", seed=0)
    ref = copy.deepcopy(model).cuda().half()
    model = with_executor(model.cuda().half(), "fast")
    assert isinstance(model.decoder, cuda.CudaSequential)
    z = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.float16)
    outs = [model.decode(z) for _ in range(4)]
    cache = cuda.graph_cache(model, "decoder")
    assert cache.stats.captures == 1 and cache.stats.replays == 2
    for out in outs:
        torch.testing.assert_close(out.float(), ref.decode(z).float(), atol=2e-2, rtol=0)
    assert torch.equal(outs[1], outs[3])


@needs_cuda
def test_fusion_probe_result_is_consistent_on_cuda():
    x = torch.zeros(1, 16, 8, 8, device="cuda", dtype=torch.float16)
    assert isinstance(cuda.fusion_available(x), bool)


# ---------------------------------------------------------------- the one script, CPU smoke mode


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "GPU.md"
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--output", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    for heading in ("## Machine", "## Targets (issue 19)", "## Speed", "## Accuracy", "## Notes"):
        assert heading in text
    assert (
        "| decode | 32² | 1 | taesd | float32 |" in text and "| decode | 32² | 1 | plain | float32 |" in text
    )
    assert "measured here: copy" in text
    if WEIGHTS:
        assert "Accuracy check: passed" in text
