"""The Winograd convolution kernel (taesd.runtime.winograd): against PyTorch's convolution, inside the fast
executor on the published taef2 weights, its switch and its fallback."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import taesd
from conftest import photo
from taesd.model import create
from taesd.runtime import isa, native, winograd
from taesd.runtime.executors.cpu import FastConv2d, make_fast

pytestmark = pytest.mark.skipif(not winograd.available(),
                                reason=f"Winograd kernel not built here: {winograd.load_error()}")


def reference(x, weight, bias, residual=None, relu=False):
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    if residual is not None:
        y = y + residual.double()
    return y.relu() if relu else y


@pytest.mark.parametrize("m", winograd.TILES)
@pytest.mark.parametrize("shape", [(1, 64, 64, 64, 64), (2, 32, 37, 53, 48), (3, 8, 50, 9, 16)])
def test_kernel_matches_convolution(m, shape):
    """Odd sizes (partial tiles at the right and bottom edges), batches (tiles numbered across
    images), channel counts other than 64, with and without bias, residual and ReLU."""
    n, ci, h, w, co = shape
    x = torch.randn(n, ci, h, w)
    weight = torch.randn(co, ci, 3, 3) / (3 * ci ** 0.5)
    bias = torch.randn(co)
    res = torch.randn(n, co, h, w)
    U = winograd.transform_weight(weight, m)
    for b, r, relu in ((bias, None, False), (None, None, True), (bias, res, True), (None, res, False)):
        y = winograd.conv3x3(x, U, b, m, residual=r, relu=relu)
        ref = reference(x, weight, b, r, relu)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
        tol = 2e-5 if m == 2 else 1e-4     # F(4x4) rounds more: its transforms scale by up to 8
        assert (y.double() - ref).abs().max().item() < tol * ref.abs().max().item()
    # the output is really a function of the input: a change in one pixel moves its 3x3 neighbourhood
    x2 = x.clone()
    x2[0, :, h // 2, w // 2] += 1
    diff = (winograd.conv3x3(x2, U, bias, m) - winograd.conv3x3(x, U, bias, m)).abs().sum(1)[0]
    assert diff[h // 2 - 1:h // 2 + 2, w // 2 - 1:w // 2 + 2].min() > 1e-2
    diff[h // 2 - 1:h // 2 + 2, w // 2 - 1:w // 2 + 2] = 0
    assert diff.max() < 1e-3          # elsewhere in the same tiles: rounding only
    diff[max(0, h // 2 - m):h // 2 + m + 1, max(0, w // 2 - m):w // 2 + m + 1] = 0
    assert diff.max() == 0            # other tiles: untouched


@pytest.mark.parametrize("m", winograd.TILES)
def test_kernel_reads_the_input_upsampled_on_the_fly(m):
    """upsample=True convolves the nearest 2x upsampling of x (the decoder's Upsample + conv)
    without making it; odd small sizes give partial tiles."""
    x = torch.randn(2, 64, 37, 29)
    weight = torch.randn(48, 64, 3, 3) / 24
    bias = torch.randn(48)
    y = winograd.conv3x3(x, winograd.transform_weight(weight, m), bias, m, upsample=True, relu=True)
    ref = reference(F.interpolate(x, scale_factor=2), weight, bias, relu=True)
    assert y.shape == (2, 48, 74, 58)
    assert (y.double() - ref).abs().max().item() < (2e-5 if m == 2 else 1e-4) * ref.abs().max().item()


def test_kernel_rejects_shapes_it_cannot_run():
    U = winograd.transform_weight(torch.randn(64, 64, 3, 3), 4)
    with pytest.raises(ValueError, match="does not fit"):
        winograd.conv3x3(torch.randn(1, 32, 16, 16), U, None, 4)
    with pytest.raises(ValueError, match="residual"):
        winograd.conv3x3(torch.randn(1, 64, 16, 16), U, None, 4, residual=torch.randn(1, 64, 8, 8))
    conv = nn.Conv2d(64, 64, 3, padding=1)
    assert winograd.supports(conv, torch.zeros(1, 64, 64, 64))
    assert not winograd.supports(conv, torch.zeros(1, 64, 8, 8))              # small map: direct
    # an fp32 layer computing in bf16: only where the bf16 kernel runs and pays (AVX-512-BF16, no AMX)
    bf16_ok = winograd.bf16_available() and isa.winograd_bf16()
    assert winograd.supports(conv, torch.zeros(1, 64, 64, 64, dtype=torch.bfloat16)) == bf16_ok
    assert not winograd.supports(conv, torch.zeros(1, 64, 64, 64, dtype=torch.float16))
    assert not winograd.supports(nn.Conv2d(64, 64, 3, padding=1, stride=2), torch.zeros(1, 64, 64, 64))
    assert not winograd.supports(nn.Conv2d(3, 64, 3, padding=1), torch.zeros(1, 3, 64, 64))


def test_transformed_weight_follows_weight_changes():
    model = make_fast(create("taesd", parts=("decoder",)))
    conv = model.decoder[3].conv[0]
    assert type(conv) is FastConv2d and conv.winograd == 4
    U1 = conv.winograd_weight(4, torch.float32)
    assert conv.winograd_weight(4, torch.float32) is U1                 # cached
    Ub = conv.winograd_weight(4, torch.bfloat16)                        # computing in bf16: its own U
    assert Ub.dtype == torch.bfloat16 and Ub.shape == (36, 32, 64, 2)
    assert torch.equal(Ub, winograd.transform_weight(conv.weight, 4, torch.bfloat16))
    with torch.no_grad():
        conv.weight.mul_(2)
    U2 = conv.winograd_weight(4, torch.float32)
    assert torch.allclose(U2, 2 * U1)
    state = copy.deepcopy(model.state_dict())
    assert not any("wino" in k for k in state)                  # nothing new in the state_dict


@pytest.fixture(scope="module")
def taef2_models(weights):
    plain = taesd.load("taef2", weights, device="cpu", executor="plain")
    return plain, taesd.load("taef2", weights, device="cpu"), copy.deepcopy(plain).double()


def test_taef2_decode_within_1e4_of_plain_and_encode_within_fp32_rounding(taef2_models):
    """Real weights, real photos. Decoded pixels (F(4x4)): within 1e-4 of the plain fp32 network.
    Latents (F(4x4) at full resolution, F(2x2) after): plain fp32 is itself ~1e-4 off a float64
    evaluation on some photos, so the bar is the float64 result: within 1e-5 of the latents' range
    (>= 100 dB) and a few times plain fp32's own error (measured up to 3.5x on chelsea, 2e-5)."""
    plain, fast, exact = taef2_models
    x = torch.stack([photo("astronaut", 256), photo("chelsea", 256)])
    z, zf, z64 = plain.encode(x), fast.encode(x), exact.encode(x.double())
    assert fast.encoder[1].conv[0].winograd_tile(torch.zeros(1, 64, 256, 256)) == 4   # full resolution
    assert fast.encoder[3].conv[0].winograd_tile(torch.zeros(1, 64, 128, 128)) == 2   # after a stride 2
    plain_err, fast_err = (z.double() - z64).abs().max().item(), (zf.double() - z64).abs().max().item()
    assert fast_err <= 1e-5 * (z64.max() - z64.min()).item()
    assert fast_err <= 4 * plain_err + 1e-5
    assert (zf - z).abs().max().item() < 1e-4
    assert (fast.decode(z) - plain.decode(z)).abs().max().item() < 1e-4


def test_switch_off_gives_the_direct_path_bit_exact(taef2_models, monkeypatch):
    plain, fast, _ = taef2_models
    z = torch.randn(1, 32, 24, 24)
    with_wino = fast.decode(z)
    monkeypatch.setenv(winograd.ENV_SWITCH, "0")
    assert not winograd.available()
    direct = fast.decode(z)
    assert not torch.equal(direct, with_wino)          # the kernel really ran before
    assert (direct - plain.decode(z)).abs().max().item() < 1e-5   # oneDNN, same sums as plain
    no_wino = make_fast(create("taef2"), use_winograd=False)
    assert all(getattr(m, "winograd", 0) == 0 for m in no_wino.modules())


@pytest.mark.parametrize("per_image_bytes", [1, 64 * 32 * 32 * 4, 1 << 40])
def test_batches_split_per_image_give_the_same_result(per_image_bytes, monkeypatch):
    """Big maps run image by image, small ones batched (fast.PER_IMAGE_BYTES); any split is exact."""
    from taesd.runtime.executors import cpu as fast
    monkeypatch.setattr(fast, "PER_IMAGE_BYTES", per_image_bytes)
    model = make_fast(create("taef2"))      # GroupNorm in the pool branch: per-sample statistics
    z = torch.randn(3, 32, 8, 8)
    x = torch.rand(3, 3, 128, 128)
    for run, inp in ((model.decode, z), (model.encode, x)):
        batch = run(inp)
        single = torch.cat([run(inp[i:i + 1]) for i in range(3)])
        assert (batch - single).abs().max().item() < 1e-5


def test_missing_compiler_falls_back_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv(winograd.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setattr(winograd, "_lib", None)
    monkeypatch.setattr(winograd, "_lib_error", None)
    assert winograd.library() is None and not winograd.available()
    assert "no C++ compiler" in winograd.load_error()
    model = make_fast(create("taesd", parts=("decoder",)))
    assert model.decode(torch.randn(1, 4, 16, 16)).shape == (1, 3, 128, 128)   # direct path
    assert not list(tmp_path.iterdir())                                        # no half-built file


def test_build_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv(winograd.ENV_CACHE, str(tmp_path))
    path = winograd.build()
    assert path.parent == tmp_path and path.stat().st_size > 0
    mtime = path.stat().st_mtime_ns
    assert winograd.build() == path and path.stat().st_mtime_ns == mtime     # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]               # no temp files left


@pytest.mark.parametrize("bits", [256, 512])
def test_gemm_widths_agree_with_convolution(bits):
    """The AVX-512 GEMM (where built) and the AVX2 one: both against F.conv2d, both the same sums."""
    if winograd.gemm_width() != 512 and bits == 512:
        pytest.skip("the kernel was built without AVX-512 here")
    before = winograd.gemm_width()
    x, weight, bias = torch.randn(2, 64, 30, 22), torch.randn(64, 64, 3, 3) / 24, torch.randn(64)
    try:
        assert winograd.gemm_width(bits) == bits
        for m in winograd.TILES:
            y = winograd.conv3x3(x, winograd.transform_weight(weight, m), bias, m, relu=True)
            ref = reference(x, weight, bias, relu=True)
            assert (y.double() - ref).abs().max().item() < (2e-5 if m == 2 else 1e-4) * ref.abs().max().item()
    finally:
        winograd.gemm_width(before)


bf16_only = pytest.mark.skipif(not winograd.bf16_available(), reason="no AVX-512-BF16 kernel on this CPU")


@bf16_only
@pytest.mark.parametrize("m", winograd.TILES)
@pytest.mark.parametrize("upsample", [False, True])
def test_bf16_kernel_matches_convolution_of_the_bf16_values(m, upsample):
    """bf16 activations and weights, fp32 sums, one bf16 rounding of the transformed values and of
    the output: close to the exact convolution of the same bf16 numbers (F(2x2): within 1% of the
    output's range; F(4x4)'s transforms magnify the rounding: within 5%)."""
    x, weight = torch.randn(2, 64, 37, 29).bfloat16(), (torch.randn(64, 64, 3, 3) / 24).bfloat16()
    bias = torch.randn(64).bfloat16()
    h, w = (74, 58) if upsample else (37, 29)
    res = torch.randn(2, 64, h, w).bfloat16()
    U = winograd.transform_weight(weight, m)
    assert U.dtype == torch.bfloat16 and U.shape == ((m + 2) ** 2, 32, 64, 2)
    y = winograd.conv3x3(x, U, bias, m, residual=res, relu=True, upsample=upsample)
    xin = F.interpolate(x.double(), scale_factor=2) if upsample else x
    ref = reference(xin, weight, bias, res, relu=True)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    err = (y.double() - ref).abs().max().item() / ref.abs().max().item()
    assert err < (1e-2 if m == 2 else 5e-2)
    # an fp32 layer computing in bf16: its fp32 weight transformed, then rounded once
    weight32 = torch.randn(64, 64, 3, 3) / 24
    y32 = winograd.conv3x3(x, winograd.transform_weight(weight32, m, torch.bfloat16), bias, m, residual=res,
                           relu=True, upsample=upsample)
    ref32 = reference(xin, weight32, bias, res, relu=True)
    assert (y32.double() - ref32).abs().max().item() < (1e-2 if m == 2 else 5e-2) * ref32.abs().max().item()
    with pytest.raises(ValueError, match="differ"):
        winograd.conv3x3(x.float(), U, None, m)
    conv = nn.Conv2d(64, 64, 3, padding=1).bfloat16()
    # Chosen where it pays: not on AMX CPUs, whose direct bf16 convolutions are faster.
    assert winograd.supports(conv, torch.zeros(1, 64, 64, 64, dtype=torch.bfloat16)) == isa.winograd_bf16()
    assert not winograd.supports(nn.Conv2d(64, 48, 3, padding=1).bfloat16(),
                                 torch.zeros(1, 64, 64, 64, dtype=torch.bfloat16))   # 64k outputs only


@bf16_only
def test_bf16_taef2_holds_40_db_and_tiles_exactly(weights):
    """Real weights, real photos: the bf16 model (its 3x3 convolutions in the bf16 Winograd kernel)
    decodes and encodes >= 40 dB against fp32; tiled = untiled."""
    from taesd.evaluation.metrics import psnr
    plain = taesd.load("taef2", weights, device="cpu", executor="plain")
    bf16 = taesd.load("taef2", weights, device="cpu", dtype=torch.bfloat16)
    x = torch.stack([photo("astronaut", 256), photo("chelsea", 256)])
    with torch.inference_mode():
        z = plain.encode(x)
        ref = plain.decode(z)
        tile = bf16.decoder[3].conv[0].winograd_tile(torch.zeros(1, 64, 64, 64, dtype=torch.bfloat16))
        assert tile == (4 if isa.winograd_bf16() else 0)   # AMX: oneDNN's direct bf16 convolutions
        # the encoder's downsampled stages too: F(4x4) for every conv in bf16
        enc_tile = bf16.encoder[3].conv[0].winograd_tile(torch.zeros(1, 64, 64, 64, dtype=torch.bfloat16))
        assert enc_tile == (4 if isa.winograd_bf16() else 0)
        y = bf16.decode(z.bfloat16())
        assert psnr(y.float(), ref).min() >= 40
        assert psnr(plain.decode(bf16.encode(x.bfloat16()).float()), ref).min() >= 40
        assert torch.equal(bf16.decode(z.bfloat16(), tile_size=16), y)


def test_wide_layers_take_smaller_tiles(monkeypatch):
    """A conv whose transformed weight would pass the limit (3/8 of the L3, 12 to 48 MiB) takes F(2x2),
    then direct; the image networks' 64-channel convs keep their plan; bf16's weight is half the bytes."""
    from taesd.runtime.executors import cpu
    conv = torch.nn.Conv2d
    monkeypatch.setattr(isa, "l3_cache_bytes", lambda: 480 * 2 ** 20)   # a Xeon's: 48 MiB
    assert cpu.wide_weight_bytes() == 48 * 2 ** 20
    assert cpu.winograd_tile_of(4, False, conv(256, 512, 3)) == 4      # 18 MiB
    assert cpu.winograd_tile_of(4, False, conv(512, 1024, 3)) == 2     # 72 MiB -> 32 MiB
    monkeypatch.setattr(isa, "l3_cache_bytes", lambda: None)            # unknown: 12 MiB
    assert cpu.wide_weight_bytes() == 12 * 2 ** 20
    monkeypatch.setattr(isa, "l3_cache_bytes", lambda: 32 * 2 ** 20)    # a Zen 3's: 12 MiB
    assert cpu.wide_weight_bytes() == 12 * 2 ** 20
    monkeypatch.setattr(isa, "winograd_bf16", lambda *a: False)
    assert cpu.winograd_tile_of(4, False, conv(64, 64, 3)) == 4
    assert cpu.winograd_tile_of(2, False, conv(64, 64, 3)) == 2
    assert cpu.winograd_tile_of(4, False, conv(256, 256, 3)) == 4      # 9 MiB
    assert cpu.winograd_tile_of(4, False, conv(256, 512, 3)) == 2      # 18 MiB -> 8 MiB
    assert cpu.winograd_tile_of(4, False, conv(512, 1024, 3)) == 0     # F(2x2): 32 MiB
    monkeypatch.setattr(isa, "winograd_bf16", lambda *a: True)
    assert cpu.winograd_tile_of(2, True, conv(256, 512, 3)) == 4       # bf16: 9 MiB
    assert cpu.winograd_tile_of(2, True, conv(512, 1024, 3)) == 0      # 36 MiB, then 16 MiB


def test_bf16_tile_plan_follows_the_cpu(monkeypatch):
    """bf16 plans F(4x4) for every Winograd conv where bf16 runs the Winograd kernel (AVX-512-BF16,
    no AMX); on AMX CPUs (our tile kernel, no alignment needed) the fp32 plan stays."""
    from taesd.runtime.executors import cpu
    monkeypatch.setattr(isa, "winograd_bf16", lambda *a: True)
    assert cpu.winograd_tile_of(2, True) == 4 and cpu.winograd_tile_of(4, True) == 4
    assert cpu.winograd_tile_of(2, False) == 2 and cpu.winograd_tile_of(0, True) == 0
    monkeypatch.setattr(isa, "winograd_bf16", lambda *a: False)
    assert cpu.winograd_tile_of(2, True) == 2
