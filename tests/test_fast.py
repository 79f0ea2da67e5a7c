"""The CPU executor (taesd.runtime.executors.cpu), previews and the bench command, on the published taef2 weights
and real photos."""
import copy
import io
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import taesd
from conftest import ROOT, photo
from taesd.evaluation.metrics import psnr
from taesd.nn.layers import Block
from taesd.runtime.executors.cpu import (
    FastBlock,
    FastConv2d,
    FastSequential,
    fused_available,
    make_plain,
    upsample_conv,
)
from taesd.runtime.preview_decode import preview_decode


@pytest.fixture(scope="module")
def pair(weights):
    """(plain fp32 eager, default fast) taef2 with the published weights."""
    return taesd.load("taef2", weights, device="cpu", executor="plain"), taesd.load("taef2", weights, device="cpu")


@pytest.fixture(scope="module")
def images():
    return torch.stack([photo("astronaut", 128), photo("coffee", 128)])


def test_load_is_fast_by_default_and_keeps_the_published_layout(pair):
    plain, fast = pair
    assert any(type(m) is FastBlock for m in fast.decoder) and not any(type(m) is FastBlock for m in plain.decoder)
    assert isinstance(fast.decoder, nn.Sequential) and len(fast.decoder) == len(plain.decoder)
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert fast.decoder[1].weight.is_contiguous(memory_format=torch.channels_last)
    for key, value in plain.state_dict().items():
        assert torch.equal(fast.state_dict()[key], value)


def test_fast_fp32_matches_plain_network(pair, images):
    plain, fast = pair
    z = plain.encode(images)
    assert (fast.encode(images) - z).abs().max().item() < 1e-4
    assert (fast.decode(z) - plain.decode(z)).abs().max().item() < 1e-4


def test_fused_kernels_run_inside_inference_mode(pair):
    """decode/encode run under inference_mode; the fused path must be taken there (fp32 always has it)."""
    _, fast = pair
    with torch.inference_mode():
        assert fused_available(torch.zeros(1, 8, 4, 4), fast.decoder[3])
    assert type(fast.decoder) is FastSequential and type(fast.decoder[2:9]) is FastSequential


def test_upsample_conv_equals_upsample_then_conv(pair):
    """The 2x2 phase form of nearest-upsample + 3x3 conv (4 instead of 9 multiply-adds)."""
    plain, fast = pair
    x = torch.randn(2, 64, 9, 13)
    with torch.inference_mode():
        want = plain.decoder[7](F.interpolate(x, scale_factor=2, mode="nearest"))
        got = upsample_conv(fast.decoder[7], x)
    assert got.shape == want.shape == (2, 64, 18, 26)
    assert (got - want).abs().max().item() < 1e-4


def test_layer_slices_match_and_leave_their_input_alone(pair):
    """Tiling runs slices of the Sequential on views of bigger tensors."""
    plain, fast = pair
    big = torch.randn(1, 64, 20, 20)
    crop = big[:, :, 2:18, 3:19]            # a non-contiguous view, like a tile with margin
    before = big.clone()
    out = fast.decoder[8:13](crop)           # blocks, upsample, conv
    assert torch.equal(big, before)
    assert (out - plain.decoder[8:13](crop)).abs().max().item() < 1e-4


def test_new_weights_are_repacked(weights, pair):
    plain, _ = pair
    fast = taesd.load("taef2", weights, device="cpu")
    z = torch.randn(1, 32, 8, 8)
    first = fast.decode(z)
    with torch.no_grad():
        for p in fast.decoder.parameters():
            p.mul_(0.9)
    assert not torch.allclose(fast.decode(z), first)
    fast.decoder.load_state_dict(plain.decoder.state_dict())
    assert (fast.decode(z) - plain.decode(z)).abs().max().item() < 1e-4


def test_copies_and_saves_work(pair):
    _, fast = pair
    z = torch.randn(1, 32, 8, 8)
    twin = copy.deepcopy(fast)
    assert torch.equal(twin.decode(z), fast.decode(z))
    buf = io.BytesIO()
    torch.save(fast.decoder.state_dict(), buf)
    buf.seek(0)
    assert set(torch.load(buf, weights_only=True)) == set(fast.decoder.state_dict())


def test_autograd_falls_back_to_the_plain_forward(weights):
    model = taesd.load("taef2", weights, device="cpu", parts="decoder").requires_grad_(True)
    out = model.decoder(torch.randn(1, 32, 8, 8))
    out.mean().backward()
    assert model.decoder[1].weight.grad is not None and model.decoder[1].weight.grad.abs().sum() > 0


def test_make_plain_restores_the_published_modules(weights):
    model = make_plain(taesd.load("taef2", weights, device="cpu", parts="decoder"))
    assert not any(type(m) in (FastBlock, FastConv2d) for m in model.decoder.modules())
    assert any(type(m) is Block for m in model.decoder)


def test_bf16_mode_psnr_against_fp32(weights, pair, images):
    plain, _ = pair
    bf16 = taesd.load("taef2", weights, device="cpu", dtype=torch.bfloat16)
    images = images[:1, :, :64, :64]  # bf16 runs emulated (slow) on CPUs without AVX-512/AVX-NE-CONVERT
    z = plain.encode(images)
    assert psnr(bf16.decode(z).float(), plain.decode(z)).min().item() >= 40
    assert psnr(plain.decode(bf16.encode(images).float()), plain.decode(z)).min().item() >= 40


def test_allocator_setting_stops_page_faults_and_can_be_switched_off():
    """A chain of 64 MiB activations, each freed after the next is made (as in a decode): with the
    setting the freed pages are reused, without it each result is a fresh mmap, faulted in again."""
    script = textwrap.dedent("""
        import resource, sys, torch
        sys.path.insert(0, sys.argv[1])
        from taesd.runtime.executors.cpu import tune_allocator
        on = tune_allocator()
        x = torch.ones(16 << 20)                  # 64 MiB
        faults = 0
        for turn in range(3):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            y = x
            for _ in range(4):
                y = torch.relu(y + 1)
            if turn:                               # the first turn warms the heap up
                faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print(on, faults)
    """)
    runs = {}
    for env_value in ("1", "0"):
        env = {"TAESD_MALLOPT": env_value, "PATH": "/usr/bin:/bin"}
        results = []
        for _ in range(2):   # best of two processes: the heap layout (ASLR) varies per process
            out = subprocess.run([sys.executable, "-c", script, str(ROOT / "src")], env=env,
                                 capture_output=True, text=True, check=True).stdout.split()
            results.append((out[0] == "True", int(out[1])))
        runs[env_value] = min(results, key=lambda r: r[1])
    assert runs["1"][0] and not runs["0"][0]
    assert runs["0"][1] > 2 * 8 * 16384 * 0.9       # 8 fresh 64 MiB maps per turn, 4 KiB pages
    # usually 0; heap layout (ASLR) sometimes leaves one fresh map per turn
    assert runs["1"][1] < runs["0"][1] / 3


def test_preview_decode_sizes_and_quality(pair, images):
    plain, fast = pair
    z = plain.encode(images)
    full = plain.decode(z)
    for factor in (2, 4):
        small = preview_decode(fast, z, factor)
        assert small.shape[-2:] == (128 // factor, 128 // factor)
        assert psnr(small, F.avg_pool2d(full, factor)).min().item() > 22
    assert torch.equal(preview_decode(fast, z, 1), fast.decode(z))
    with pytest.raises(taesd.TaesdError, match="factor"):
        preview_decode(fast, z, 3)


def test_bench_command_writes_a_report(tmp_path):
    out = tmp_path / "RESULTS.md"
    env_path = str(ROOT / "src")
    result = subprocess.run(
        [sys.executable, "-m", "taesd", "bench", "--ops", "decode", "--sizes", "64", "--batches", "1",
         "--calls", "3", "--warmup", "1", "--competitors", "taesd", "--no-accuracy", "-o", str(out)],
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert "| decode | 64² | 1 | taesd |" in text
    assert "conv-peak" in text and "## Machine" in text


def test_onnx_export_of_a_fast_model_has_standard_ops_only(pair):
    """Exporters trace the plain graph (the ONNX backend exports models that taesd.load made fast)."""
    import onnx
    import onnxruntime as ort
    plain, fast = pair
    z = torch.randn(1, 32, 8, 8)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(fast.decoder, (z,), buf, dynamo=False, input_names=["z"], output_names=["y"])
    ops = {n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node}
    assert "Conv" in ops and not any("mkldnn" in op.lower() for op in ops)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"z": z.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(y) - plain.decoder(z)).abs().max().item() < 1e-4
