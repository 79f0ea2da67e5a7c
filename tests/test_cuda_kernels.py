"""Our GPU kernels (taesd.runtime.executors.cuda_kernels) against the plain network, on the CPU: the
sub-pixel rewrite exactly, the Triton kernels in Triton's interpreter (TRITON_INTERPRET=1) against
torch.nn.functional.conv2d on small shapes; on a GPU (gpu_check.sh) the same kernels compiled."""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import taesd

SRC = Path(__file__).resolve().parents[1] / "src" / "taesd" / "runtime"
CUDA = torch.cuda.is_available()


def _load_kernels():
    """The module loaded from its file, with Triton's interpreter on where there is no GPU (the
    choice is made when the kernel is decorated, so a private copy keeps other tests unaffected)."""
    path = next(p for p in (SRC / "executors" / "cuda_kernels.py", SRC / "cuda_kernels.py") if p.is_file())
    old = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("_taesd_cuda_kernels_under_test", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    return module


ck = _load_kernels()
DEVICE = "cuda" if CUDA else "cpu"
# Triton reads TRITON_INTERPRET once per process (other suites may import it first), so without a GPU
# the kernel tests run in a child process started with the interpreter on (test_kernels_in_a_child).
IN_CHILD = CUDA or os.environ.get("TAESD_KERNEL_CHILD") == "1"
def needs_triton(test):
    """A Triton kernel test: on a GPU compiled, without one in the interpreter child process only
    (tests/conftest.py leaves it out of the parent)."""
    return pytest.mark.triton_child(pytest.mark.skipif(ck.triton is None, reason="needs triton (pip install triton)")(test))


@pytest.mark.skipif(ck.triton is None or IN_CHILD, reason="triton missing, or this is the child")
def test_kernels_in_a_child_process_with_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "TAESD_KERNEL_CHILD": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                        str(tmp_path / "t"), __file__, "-k", "triton"], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0 and " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-3000:]


@pytest.fixture
def interpret(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _upsample_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv(F.interpolate(x, scale_factor=2, mode="nearest"))


# ---------------------------------------------------------------- sub-pixel (any device)


@pytest.mark.parametrize("shape", [(2, 8, 7, 9), (1, 3, 1, 1), (1, 16, 4, 4)])
def test_transposed_conv_is_upsample_then_conv(shape):
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], 5, 3, padding=1).double()
    x = torch.randn(shape, dtype=torch.float64)
    out = F.conv_transpose2d(x, ck.tconv_weight(conv.weight), conv.bias, stride=2, padding=1)
    torch.testing.assert_close(out, _upsample_conv(conv, x), atol=1e-12, rtol=0)


def test_rewrite_keeps_state_dict_and_matches_the_plain_decoder():
    model = taesd.create("taesd", seed=0)
    plain = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    ck.rewrite(model.decoder, subpixel="tconv")
    kinds = [type(m).__name__ for m in model.decoder]
    assert kinds.count("SubpixelConv2d") == 3 and kinds.count("FoldedUpsample") == 3
    after = model.decoder.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    z = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(model.decoder(z), plain.decoder(z), atol=2e-5, rtol=0)


def test_rewrite_follows_weight_changes():
    model = taesd.create("taesd", seed=0)
    ck.rewrite(model.decoder, subpixel="tconv")
    z = torch.randn(1, 4, 4, 4)
    first = model.decoder(z).detach()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(0.5)
    assert not torch.allclose(model.decoder(z), first)  # the derived 4x4 weights were remade


def test_rewrite_leaves_other_layers_alone():
    seq = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(4, 4, 3, padding=1),
                        nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 5, padding=2))
    ck.rewrite(seq, subpixel="tconv")
    assert [type(m) for m in seq] == [nn.Upsample, nn.Conv2d, nn.Upsample, nn.Conv2d]


def test_available_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not ck.available("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ck.available("cpu") == (ck.triton is not None)


# ---------------------------------------------------------------- Triton kernels


@needs_triton
@pytest.mark.parametrize(
    "c,o,stride,residual,relu,dtype",
    [
        (16, 16, 1, True, True, torch.float32),
        (4, 20, 1, False, True, torch.float32),  # the decoder's first conv: 4 input channels
        (16, 3, 1, False, False, torch.float32),  # its last: 3 output channels
        (16, 16, 2, False, False, torch.float32),  # the encoder's stride-2 convs
        (32, 32, 1, True, True, torch.float16),
    ],
)
def test_triton_conv_matches_conv2d(interpret, c, o, stride, residual, relu, dtype):
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(c, o, 3, padding=1, stride=stride)
    x = torch.randn(2, c, 7, 9, generator=gen)
    ref = conv(x)
    r = torch.randn(ref.shape, generator=gen) if residual else None
    ref = ref + r if residual else ref
    ref = ref.relu() if relu else ref
    cl = torch.channels_last

    def cast(t):
        t = None if t is None else t.detach().to(DEVICE, dtype)
        return t.contiguous(memory_format=cl) if t is not None and t.dim() == 4 else t

    out = ck.conv3x3_nhwc(cast(x), ck.gemm_weights(cast(conv.weight)), cast(conv.bias), cast(r), relu, stride)
    assert out.is_contiguous(memory_format=cl) and out.shape == ref.shape
    tol = 1e-4 if dtype == torch.float32 and not CUDA else 2e-2  # fp32 tl.dot is TF32 on a GPU
    torch.testing.assert_close(out.float().cpu(), ref.detach(), atol=tol, rtol=tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_phase_kernel_is_upsample_then_conv(interpret, dtype):
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(2, 8, 5, 6, generator=gen)
    ref = _upsample_conv(conv, x).detach()
    xs = x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    out = ck.conv3x3_nhwc(xs, ck.phase_weights(conv.weight.detach().to(DEVICE, dtype)),
                          conv.bias.detach().to(DEVICE, dtype), phases=4)
    tol = 1e-4 if dtype == torch.float32 and not CUDA else 2e-2
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=tol)


@needs_triton
def test_triton_rewrite_matches_the_plain_network(interpret):
    plain = taesd.create("taesd", seed=0).to(DEVICE)
    model = copy.deepcopy(plain).to(torch.float16 if CUDA else torch.float32)  # fp16: what runs on a GPU
    tol = 3e-2 if CUDA else 1e-4
    for part in model.parts:
        ck.rewrite(model.part(part), subpixel="triton", triton_convs=True)
    assert any(type(m).__name__ == "TritonBlock" for m in model.decoder.modules())
    assert any(type(m).__name__ == "TritonConv2d" for m in model.encoder.modules())
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 2, 2, generator=gen).to(DEVICE)  # small: the interpreter runs each program
    x = torch.rand(1, 3, 16, 16, generator=gen).to(DEVICE)
    with torch.inference_mode():
        for part, inp in ((model.decoder, z), (model.encoder, x)):
            ref = (plain.decoder if part is model.decoder else plain.encoder)(inp)
            out = part(inp.to(model.dtype)).float()
            torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@needs_triton
def test_triton_modules_fall_back_under_autograd(interpret):
    model = taesd.create("taesd", seed=0)
    ck.rewrite(model.decoder, subpixel="triton", triton_convs=True)
    z = torch.randn(1, 4, 3, 3, requires_grad=True)
    model.decoder(z).sum().backward()  # the plain forward records a graph; the kernels do not
    assert z.grad is not None and torch.isfinite(z.grad).all()
