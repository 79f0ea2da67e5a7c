"""The CPU precision rule as users meet it (TAESD_CPU_BF16 unset here): an fp32 model computes in bf16
where the CPU has AMX (as OpenVINO's default does), its inputs and outputs stay fp32, an explicit dtype
is what it computes in, tiled = untiled, and the real weights hold >= 40 dB against fp32."""
import pytest
import torch

import taesd
from taesd.runtime import isa
from taesd.runtime.executors import CpuExecutor, exact_if_asked, resolve
from taesd.runtime.executors.cpu import fused_available

BF16_NATIVE = fused_available(torch.zeros(1, dtype=torch.bfloat16))
needs_bf16 = pytest.mark.skipif(not BF16_NATIVE, reason="this CPU has no native bf16 convolutions "
                                                        "(AVX-512-BF16 or AMX)")


@pytest.fixture(autouse=True)
def cpu_decides(monkeypatch):
    monkeypatch.delenv("TAESD_CPU_BF16", raising=False)


def test_the_default_follows_the_cpu(monkeypatch):
    model = taesd.create("taesd")
    CpuExecutor().apply(model)
    expected = isa.default_dtype() if BF16_NATIVE else torch.float32
    assert model.dtype == torch.float32 and model.compute_dtype == expected
    for planted, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(isa, "default_dtype", lambda *a, d=planted: torch.bfloat16 if d else torch.float32)
        assert model.compute_dtype == (want if BF16_NATIVE else torch.float32)


def test_the_setting_and_an_explicit_dtype_win(monkeypatch):
    model = CpuExecutor().apply(taesd.create("taesd"))
    monkeypatch.setattr(isa, "default_dtype", lambda *a: torch.bfloat16)
    monkeypatch.setenv("TAESD_CPU_BF16", "0")
    assert model.compute_dtype == torch.float32
    monkeypatch.delenv("TAESD_CPU_BF16")
    exact = exact_if_asked(resolve(None, "cpu"), "fp32")
    assert exact.bf16 is False and exact_if_asked(resolve(None, "cpu"), None).bf16 is None
    assert exact.apply(taesd.create("taesd")).compute_dtype == torch.float32
    # A bf16 model computes in bf16, whatever the rule; a moved model keeps its executor's options.
    assert CpuExecutor(bf16=False).apply(taesd.create("taesd").to(torch.bfloat16)).compute_dtype == torch.bfloat16
    moved = exact.apply(taesd.create("taesd")).to("cpu", torch.float32)
    assert moved.executor.bf16 is False


def test_load_with_dtype_computes_in_it(tmp_path):
    m = taesd.create("taesd", seed=0)
    torch.save(m.encoder.state_dict(), tmp_path / "taesd_encoder.pth")
    torch.save(m.decoder.state_dict(), tmp_path / "taesd_decoder.pth")
    assert taesd.load("taesd", weights=tmp_path, dtype="fp32").executor.bf16 is False
    assert taesd.load("taesd", weights=tmp_path).executor.bf16 is None


@needs_bf16
def test_bf16_compute_keeps_fp32_in_and_out_and_tiles_exactly():
    torch.manual_seed(0)
    model = CpuExecutor(bf16=True).apply(taesd.create("taesd", seed=0))
    exact = CpuExecutor(bf16=False).apply(taesd.create("taesd", seed=0))
    z, x = torch.randn(1, 4, 24, 24), torch.rand(1, 3, 192, 192)
    for tile in (None, 8):
        y, lat = model.decode(z, tile_size=tile), model.encode(x, tile_size=tile)
        assert y.dtype == lat.dtype == torch.float32
    assert torch.equal(model.decode(z), model.decode(z, tile_size=8))
    assert torch.equal(model.encode(x), model.encode(x, tile_size=8))
    assert (model.decode(z) - exact.decode(z)).abs().max() > 0   # it did compute in bf16


@needs_bf16
def test_bf16_compute_on_the_real_weights_holds_40_db(weights):
    import skimage.data

    from taesd.evaluation.metrics import psnr
    auto = taesd.load("taef2", weights=weights, executor=CpuExecutor(bf16=True))
    exact = taesd.load("taef2", weights=weights, dtype="fp32")
    photo = torch.from_numpy(skimage.data.astronaut()[:256, :256].copy()).permute(2, 0, 1)[None].float() / 255
    z = exact.encode(photo)
    assert psnr(auto.decode(z), exact.decode(z)).item() >= 40
    assert psnr(exact.decode(auto.encode(photo)), exact.decode(z)).item() >= 40


def test_the_diffusers_drop_in_follows_the_same_rule(tmp_path):
    pytest.importorskip("diffusers")
    from taesd.integrations.diffusers import TaesdVAE
    TaesdVAE(taesd_variant="taesd").save_pretrained(tmp_path)
    auto = TaesdVAE.from_pretrained(tmp_path)
    asked = TaesdVAE.from_pretrained(tmp_path, torch_dtype=torch.float32)
    assert auto.executor.bf16 is None and asked.executor.bf16 is False
    z = torch.randn(1, 4, 8, 8)
    assert auto.decode(z).sample.dtype == asked.decode(z).sample.dtype == torch.float32


def test_every_cpu_entry_point_leaves_the_precision_to_the_rule(weights):
    """No dtype asked: load, the CLI and use_taesd_vae (a pipeline in fp32, the CPU's rule) all give
    an executor that follows the CPU's rule; an asked dtype computes in it."""
    import types

    from taesd.cli import build_parser
    from taesd.cli.common import open_model
    pytest.importorskip("diffusers")
    from taesd.integrations.diffusers.vae import use_taesd_vae
    follows = [taesd.load("taef2", device="cpu").executor,
               open_model(build_parser().parse_args(["decode", "x.png", "-v", "taef2"]), None).executor]
    pipe = types.SimpleNamespace(vae=types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32))
    follows.append(use_taesd_vae(pipe, variant="taef2").vae.executor)
    assert [e.bf16 for e in follows] == [None, None, None]
    asked = open_model(build_parser().parse_args(["decode", "x.png", "-v", "taef2", "--dtype", "fp32"]), None)
    assert asked.executor.bf16 is False and taesd.load("taef2", dtype="fp32").executor.bf16 is False
