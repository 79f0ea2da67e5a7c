"""Our narrow 3x3 conv kernel (taesd.runtime.narrow, the decoder's last conv to RGB): against a
float64 convolution, inside the CPU executor, tiled = untiled."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import taesd
from taesd.runtime import isa, narrow
from taesd.runtime.executors import CpuExecutor

pytestmark = pytest.mark.skipif(not narrow.available(), reason=f"the narrow conv kernel cannot run here: "
                                                               f"{narrow.load_error() or 'switched off'}")
BF16 = narrow.available(torch.bfloat16)


def reference(x, weight, bias):
    return F.conv2d(x.double(), weight.double(), bias.double(), padding=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64, 37, 29, 3), (2, 64, 50, 51, 8), (1, 32, 9, 5, 1), (3, 96, 6, 13, 5)])
def test_matches_convolution(dtype, shape):
    if dtype == torch.bfloat16 and not BF16:
        pytest.skip("no AVX-512-BF16 build on this CPU")
    n, ci, h, w, co = shape
    torch.manual_seed(0)
    x = torch.randn(n, ci, h, w).to(dtype)
    weight, bias = torch.randn(co, ci, 3, 3) / 24, torch.randn(co)
    packed = narrow.pack_weight(weight, dtype)
    y = narrow.conv3x3(x, packed, bias)
    assert y.dtype == dtype and y.shape == (n, co, h, w) and y.is_contiguous(memory_format=torch.channels_last)
    # the same (rounded) weights in float64: fp32 sums only, then one rounding of the output
    ref = reference(x, packed.permute(0, 3, 1, 2), bias)
    tol = 1e-6 if dtype == torch.float32 else 8e-3   # bf16 output: half an ulp is 2^-9 of the value
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol


def test_without_bias_and_on_strided_input():
    """A conv without bias; an input that is a view (a tile's crop, NCHW-contiguous): made contiguous."""
    torch.manual_seed(1)
    x = torch.randn(2, 64, 40, 40)[:, :, 3:35, 5:37]
    weight = torch.randn(3, 64, 3, 3) / 24
    y = narrow.conv3x3(x, narrow.pack_weight(weight, torch.float32), None)
    ref = F.conv2d(x.double(), weight.double(), None, padding=1)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6


def test_refuses_what_it_cannot_run():
    packed = narrow.pack_weight(torch.randn(3, 64, 3, 3), torch.float32)
    with pytest.raises(ValueError, match="does not fit"):
        narrow.conv3x3(torch.randn(1, 32, 16, 16), packed, None)
    with pytest.raises(ValueError, match="does not fit"):
        narrow.conv3x3(torch.randn(1, 64, 16, 16).bfloat16(), packed, None)
    big = torch.zeros(1, 64, 64, 64)
    assert narrow.supports(nn.Conv2d(64, 3, 3, padding=1), big)
    assert not narrow.supports(nn.Conv2d(64, 3, 3, padding=1), torch.zeros(1, 64, 8, 8))      # small: oneDNN
    assert not narrow.supports(nn.Conv2d(64, 16, 3, padding=1), big)                         # wide: oneDNN
    assert not narrow.supports(nn.Conv2d(64, 3, 3, padding=1, stride=2), big)
    assert not narrow.supports(nn.Conv2d(48, 3, 3, padding=1), torch.zeros(1, 48, 64, 64))
    # bf16 only where it was measured to pay (AVX-512-BF16 without AMX)
    assert narrow.supports(nn.Conv2d(64, 3, 3, padding=1), big.bfloat16()) == (BF16 and isa.winograd_bf16())


@pytest.mark.parametrize("bf16", [False, True])
def test_decoder_last_conv_runs_it_and_tiles_exactly(bf16):
    if bf16 and not (BF16 and isa.winograd_bf16()):
        pytest.skip("bf16 computes the last conv on the AMX kernel (tests/test_amx.py) or in oneDNN on "
                    "this CPU")
    model = CpuExecutor(bf16=bf16).apply(taesd.create("taesd", seed=0))
    plain = taesd.create("taesd", seed=0)
    last = model.decoder[-1]
    x = torch.zeros(1, 64, 96, 96, dtype=model.compute_dtype)
    assert narrow.supports(last, x)
    calls = []
    original = narrow.conv3x3
    try:
        narrow.conv3x3 = lambda *a, **k: calls.append(1) or original(*a, **k)
        z = torch.randn(1, 4, 32, 32)
        y = model.decode(z)
    finally:
        narrow.conv3x3 = original
    assert calls, "the decoder's last conv did not run the narrow kernel"
    assert torch.equal(model.decode(z, tile_size=16), y)
    with torch.inference_mode():
        ref = plain.decode(z)
    assert (y - ref).abs().max().item() < (1e-4 if not bf16 else 5e-2)
