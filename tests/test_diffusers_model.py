"""TaesdVAE, the diffusers model of every variant: real taef2 weights against taesd.load, seam-exact
tiling, every weight layout from_pretrained reads, save_pretrained bit-exactness, dtypes."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import taesd  # noqa: E402
from pipeline_configs import one_thread  # noqa: E402,F401  (autouse fixture)
from taesd import TaesdError  # noqa: E402
from taesd.integrations.diffusers import TaesdVAE  # noqa: E402
from taesd.io.weights.formats import save_weights, state_dicts, to_diffusers_keys  # noqa: E402
from taesd.registry import VARIANTS  # noqa: E402


@pytest.fixture(scope="module")
def taef2_vae(weights):
    return TaesdVAE.from_pretrained(weights, taesd_variant="taef2")


def test_real_taef2_decode_and_encode_equal_taesd_load(taef2_vae, taef2):
    z = torch.randn(2, 32, 48, 40, generator=torch.Generator().manual_seed(0))
    out = taef2_vae.decode(z)
    assert torch.equal(out.sample, taef2.decode(z) * 2 - 1)   # same executor, [0, 1] -> [-1, 1]
    assert torch.equal(taef2_vae.decode(z, return_dict=False)[0], out.sample)
    images = out.sample[:, :, :128, :128]
    latents = taef2_vae.encode(images).latents
    assert torch.equal(latents, taef2.encode((images + 1) / 2))
    assert torch.equal(taef2_vae.encode(images, return_dict=False)[0], latents)


def test_real_taef2_tiled_equals_untiled(taef2_vae):
    # 96 x 96 latents in 48-pixel tiles: each tile region is >= 48 x 48, so Winograd engages in both passes.
    z = torch.randn(1, 32, 96, 96, generator=torch.Generator().manual_seed(1))
    full = taef2_vae.decode(z).sample
    taef2_vae.enable_tiling(48)
    try:
        tiled = taef2_vae.decode(z).sample
    finally:
        taef2_vae.disable_tiling()
    # Measured: max 3e-5 with the fast executor (Winograd tiles round differently at tile edges),
    # 0 with the plain executor; both far below one 8-bit level (3.9e-3 in [-1, 1]).
    assert (tiled - full).abs().max() < 1e-4
    plain = TaesdVAE.from_taesd(taef2_vae.taesd, executor="plain")
    full_plain = plain.decode(z).sample
    plain.enable_tiling(48)
    assert (plain.decode(z).sample - full_plain).abs().max() < 1e-5


def test_slicing_equals_the_batch(taef2_vae):
    z = torch.randn(3, 32, 16, 16, generator=torch.Generator().manual_seed(2))
    whole = taef2_vae.decode(z).sample
    taef2_vae.enable_slicing()
    try:
        assert torch.allclose(taef2_vae.decode(z).sample, whole, atol=1e-6)
    finally:
        taef2_vae.disable_slicing()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_pretrained_loads_back_bit_exactly(variant, tmp_path):
    vae = TaesdVAE.from_taesd(taesd.create(variant, seed=3))
    vae.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == "TaesdVAE" and config["taesd_variant"] == variant
    back = TaesdVAE.from_pretrained(tmp_path / "vae")
    assert back.config.taesd_variant == variant
    mine, theirs = vae.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert any(k.startswith("decoder.layers.0.") for k in mine)   # AutoencoderTiny's keys
    # ...and taesd.load reads the folder too (it is a diffusers-format folder of our keys).
    model = taesd.load(variant, weights=tmp_path / "vae", device="cpu", executor="plain")
    assert all(torch.equal(a, b) for a, b in zip(model.decoder.state_dict().values(),
                                                  back.taesd.decoder.state_dict().values()))


def test_every_layout_loads(tmp_path, weights):
    ref = taesd.create("taesd3", seed=4)
    parts = state_dicts(ref)
    save_weights(parts, "taesd3", "diffusers", tmp_path / "tiny")        # an AutoencoderTiny folder
    save_weights(parts, "taesd3", "pth", tmp_path / "taesd3")            # our per-part files
    from safetensors.torch import save_file
    combined = {k: v.contiguous() for k, v in to_diffusers_keys(parts).items()}   # taef2.safetensors' layout
    save_file(combined, str(tmp_path / "taesd3.safetensors"))
    z = torch.randn(1, 16, 8, 8)
    expected = ref.decode(z) * 2 - 1
    for path in [tmp_path / "tiny", tmp_path / "taesd3", tmp_path / "taesd3.safetensors"]:
        named = path.name.startswith("taesd3")   # the name tells the variant; "tiny" does not
        vae = TaesdVAE.from_pretrained(path, taesd_variant=None if named else "taesd3")
        assert vae.config.taesd_variant == "taesd3", path
        assert torch.allclose(vae.decode(z).sample, expected, atol=1e-5), path
    # The published per-part folder: the variant comes from the files there.
    assert TaesdVAE.from_pretrained(weights, taesd_variant="taef2").config.taesd_variant == "taef2"
    # An AutoencoderTiny folder of 16 channels fits taesd3 and taef1: the name decides, or one line asks.
    with pytest.raises(TaesdError, match="taesd_variant="):
        TaesdVAE.from_pretrained(tmp_path / "tiny")


def test_diffusers_autoencoder_tiny_reads_our_saved_folder(tmp_path):
    from diffusers import AutoencoderTiny
    vae = TaesdVAE.from_taesd(taesd.create("taesd", seed=5))
    vae.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    theirs = AutoencoderTiny(latent_channels=4)
    theirs.load_state_dict(vae.state_dict())
    z = torch.randn(1, 4, 8, 8)
    assert torch.allclose(theirs.decode(z).sample.clamp(-1, 1), vae.decode(z).sample, atol=1e-5)
    assert config["block_out_channels"] == [64, 64, 64, 64]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_without_dtype_errors(dtype):
    vae = TaesdVAE.from_taesd(taesd.create("taesd", seed=6)).to(dtype)
    z = torch.randn(1, 4, 8, 8)
    out = vae.decode(z).sample          # fp32 in: cast to the model's dtype, fp32 back
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert vae.decode(z.to(dtype)).sample.dtype == dtype
    assert vae.encode(out).latents.dtype == torch.float32


def test_family_config_makes_pipeline_conversions_the_identity():
    f2 = TaesdVAE(taesd_variant="taef2")
    assert f2.config.batch_norm_eps == 0.0 and f2.bn.eps == 0.0
    assert torch.equal(f2.bn.running_mean, torch.zeros(128))
    assert torch.equal(f2.bn.running_var, torch.ones(128))
    qi = TaesdVAE(taesd_variant="taeqi2_1")
    assert qi.config.z_dim == 64
    assert qi.config.latents_mean == [0.0] * 64 and qi.config.latents_std == [1.0] * 64
    sana = TaesdVAE(taesd_variant="taesana")
    assert 2 ** (len(sana.config.encoder_block_out_channels) - 1) == 32 and sana.config.scaling_factor == 1.0
    z = torch.randn(1, 64, 1, 4, 4)   # Qwen's frame axis in, frame axis out
    assert qi.decode(z).sample.shape == (1, 4, 1, 64, 64)
    with pytest.raises(TaesdError, match="scaling_factor"):
        TaesdVAE(taesd_variant="taesd", scaling_factor=0.18215)
    with pytest.raises(TaesdError, match="frames"):
        qi.decode(torch.randn(1, 64, 2, 4, 4))


def test_import_taesd_does_not_import_diffusers():
    import subprocess
    import sys
    code = "import sys, taesd; assert 'diffusers' not in sys.modules; print(taesd.TaesdVAE.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "TaesdVAE"
