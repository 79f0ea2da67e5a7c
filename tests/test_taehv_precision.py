"""TAEHV follows the image models' CPU precision rule (TAESD_CPU_BF16 unset here): an fp32 model computes
in bf16 where the CPU has AMX, inputs and outputs keep their dtype, whole = bounded = streaming = tiled
exactly in bf16 too, and an explicit dtype (load, CLI) is what it computes in."""
import pytest
import torch

from taesd.runtime import isa
from taesd.runtime.executors.cpu import fused_available
from taesd.video import TAEHV, load, make_fast

BF16_NATIVE = fused_available(torch.zeros(1, dtype=torch.bfloat16))
needs_bf16 = pytest.mark.skipif(not BF16_NATIVE, reason="this CPU has no native bf16 convolutions "
                                                        "(AVX-512-BF16 or AMX)")


@pytest.fixture(autouse=True)
def cpu_decides(monkeypatch):
    monkeypatch.delenv("TAESD_CPU_BF16", raising=False)


def _pair(name: str, bf16: bool):
    torch.manual_seed(0)
    plain = TAEHV(name).eval()
    fast = TAEHV(name).eval()
    fast.load_state_dict(plain.state_dict())
    return plain, make_fast(fast, bf16=bf16)


def _psnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Against the reference's own range: random weights decode to a narrow band of values."""
    mse = (ref - x).double().pow(2).mean().item()
    return 10 * torch.log10(torch.tensor((ref.max() - ref.min()).item() ** 2 / mse)).item()


def test_the_default_follows_the_cpu(monkeypatch):
    expected = isa.default_dtype() if BF16_NATIVE else torch.float32
    assert make_fast(TAEHV("taew2_1", parts="decoder")).compute_dtype == expected
    for planted, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(isa, "default_dtype", lambda *a, d=planted: torch.bfloat16 if d else torch.float32)
        model = make_fast(TAEHV("taew2_1", parts="decoder"))
        assert model.compute_dtype == (want if BF16_NATIVE else torch.float32)
    monkeypatch.setenv("TAESD_CPU_BF16", "0")
    assert make_fast(TAEHV("taew2_1", parts="decoder")).compute_dtype == torch.float32


def test_an_explicit_dtype_at_load_is_what_it_computes_in(tmp_path, monkeypatch):
    monkeypatch.setattr(isa, "default_dtype", lambda *a: torch.bfloat16)
    path = tmp_path / "taew2_1.pth"
    torch.save(TAEHV("taew2_1").state_dict(), path)
    assert load(path, "taew2_1", dtype="fp32").compute_dtype == torch.float32
    if BF16_NATIVE:
        assert load(path, "taew2_1").compute_dtype == torch.bfloat16
        model = load(path, "taew2_1", dtype="bf16")
        assert next(model.parameters()).dtype == torch.bfloat16 == model.compute_dtype
        # fp32 in, fp32 out, whatever the weights are in
        assert model.decode(torch.randn(1, 2, 16, 8, 8)).dtype == torch.float32


@needs_bf16
@pytest.mark.parametrize("name", ["taew2_1", "taehv1_5_super", "taeltx2_3_wide", "taeh3"])
def test_bf16_keeps_fp32_in_and_out_and_every_mode_equal(name):
    """16x16 latents: the upsample stages run below the AMX kernel's size (oneDNN's Upsample then conv);
    the _wide block's grouped conv ends in an add + ReLU that PyTorch has no bf16 post-op for."""
    plain, fast = _pair(name, bf16=True)
    assert fast.compute_dtype == torch.bfloat16
    v = fast.variant
    z = torch.randn(1, 5, v.latent_channels, 16, 16)
    frames = torch.rand(1, 2 * fast.time_downscale + 1, 3, 16 * v.downscale, 16 * v.downscale)
    with torch.no_grad():
        ref, out = plain.decode(z), fast.decode(z)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert _psnr(ref, out) > 40
        assert torch.equal(fast.decode(z, chunk=1), out)
        assert torch.equal(fast.decode(z, tile_size=8), out)
        stream = fast.stream()
        pieces = [stream.decode(z[:, i:i + 1]) for i in range(z.shape[1])] + [stream.flush_decoder()]
        assert torch.equal(torch.cat([p for p in pieces if p is not None], 1), out)
        lat_ref, lat = plain.encode(frames), fast.encode(frames)
        assert lat.dtype == torch.float32 and lat.shape == lat_ref.shape
        assert _psnr(lat_ref, lat) > 40
        assert torch.equal(fast.encode(frames, chunk=fast.time_downscale), lat)


@needs_bf16
def test_bf16_inputs_give_bf16_outputs():
    _, fast = _pair("taew2_1", bf16=True)
    with torch.no_grad():
        out = fast.decode(torch.randn(1, 2, 16, 16, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape[-1] == 128
