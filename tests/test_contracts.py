"""Latent contracts: published constants, exact round trips, and the pipelines' own pack/unpack
functions as oracles (diffusers' static methods, not a copy of ours)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import AutoencoderKLFlux2, Flux2Pipeline, FluxPipeline, QwenImage21Pipeline  # noqa: E402

from pipeline_configs import one_thread  # noqa: E402,F401  (autouse fixture)
from taesd import TaesdError  # noqa: E402
from taesd.integrations.diffusers.contracts import (  # noqa: E402
    CONTRACTS,
    contract_for,
    contract_table,
    patchify,
    pipeline_to_taesd,
    raw_to_taesd,
    taesd_to_pipeline,
    taesd_to_raw,
    unpatchify,
    variant_for,
)
from taesd.registry import VARIANTS  # noqa: E402

# Published constants (the big VAEs' configs): taesd = (raw - shift) * scale.
PUBLISHED = {"taesd": (0.18215, 0.0), "taesdxl": (0.13025, 0.0), "taesd3": (1.5305, 0.0609),
             "taef1": (0.3611, 0.1159)}


@pytest.mark.parametrize("variant", list(PUBLISHED))
def test_raw_to_taesd_uses_the_published_constants(variant):
    scale, shift = PUBLISHED[variant]
    raw = torch.randn(2, VARIANTS[variant].latent_channels, 5, 7) * 4
    z = raw_to_taesd(raw, variant)
    assert torch.allclose(z, (raw - shift) * scale, rtol=0, atol=1e-6)
    assert torch.allclose(taesd_to_raw(z, variant), raw, rtol=0, atol=1e-5)
    c = contract_for(variant)
    assert (c.scale, c.shift, c.source) == (scale, shift, "registry")


def test_every_registry_variant_has_one_contract():
    assert set(CONTRACTS) == set(VARIANTS)
    table = contract_table()
    for c in CONTRACTS.values():
        assert c.latent_channels == VARIANTS[c.variant].latent_channels
        assert f"| {c.variant} |" in table


@pytest.mark.parametrize("variant", list(CONTRACTS))
def test_pipeline_packing_round_trip_is_exact(variant):
    c = contract_for(variant)
    z = torch.randn(2, c.latent_channels, 6, 10)
    packed = taesd_to_pipeline(z, c)
    down = VARIANTS[variant].downscale  # the image size the pipeline would be called with
    assert torch.equal(pipeline_to_taesd(packed, c, height=6 * down, width=10 * down), z)
    if packed.ndim == 3:
        assert packed.shape[1] < 60 or c.packing == "sequence"  # it really is a packed sequence


def test_flux1_unpack_equals_the_pipelines_own():
    height, width = 48, 80  # non-square: 3 x 5 packed tokens of 2x2 patches
    packed = torch.randn(2, (height // 16) * (width // 16), 64)
    theirs = FluxPipeline._unpack_latents(packed, height, width, 8)
    ours = pipeline_to_taesd(packed, "taef1", height=height, width=width)
    assert torch.equal(ours, theirs)
    ids = FluxPipeline._prepare_latent_image_ids(2, height // 16, width // 16, "cpu", torch.float32)
    assert torch.equal(pipeline_to_taesd(packed, "taef1", ids=ids), theirs)
    z = torch.randn(2, 16, 6, 10)
    assert torch.equal(taesd_to_pipeline(z, "taef1"), FluxPipeline._pack_latents(z, 2, 16, 6, 10))


def test_flux2_unpack_equals_the_pipelines_own_with_position_ids():
    spatial = torch.randn(2, 128, 3, 5)  # the pipeline's patchified latent: 128 channels at h/16
    ids = Flux2Pipeline._prepare_latent_ids(spatial)
    packed = Flux2Pipeline._pack_latents(spatial)
    theirs = Flux2Pipeline._unpatchify_latents(Flux2Pipeline._unpack_latents_with_ids(packed, ids))
    assert theirs.shape == (2, 32, 6, 10)
    assert torch.equal(pipeline_to_taesd(packed, "taef2", ids=ids), theirs)
    assert torch.equal(pipeline_to_taesd(packed, "taef2", height=48, width=80), theirs)
    assert torch.equal(pipeline_to_taesd(packed, "taef2", ids=ids[0]), theirs)   # one set for the batch
    assert torch.equal(pipeline_to_taesd(packed[1:], "taef2", ids=ids), theirs[1:])
    # Tokens in another order are put back by their position ids, like the pipeline does.
    order = torch.randperm(packed.shape[1])
    shuffled, shuffled_ids = packed[:, order], ids[:, order]
    theirs = Flux2Pipeline._unpatchify_latents(Flux2Pipeline._unpack_latents_with_ids(shuffled, shuffled_ids))
    assert torch.equal(pipeline_to_taesd(shuffled, "taef2", ids=shuffled_ids), theirs)
    # And back: our packing is the pipeline's patchify + pack.
    z = torch.randn(2, 32, 6, 10)
    assert torch.equal(taesd_to_pipeline(z, "taef2"),
                       Flux2Pipeline._pack_latents(Flux2Pipeline._patchify_latents(z)))
    assert torch.equal(patchify(z), Flux2Pipeline._patchify_latents(z))
    assert torch.equal(unpatchify(patchify(z)), z)


def test_qwen_image_21_unpack_equals_the_pipelines_own():
    height, width = 96, 160  # 16x down: a 6 x 10 latent
    packed = torch.randn(1, 60, 64)
    theirs = QwenImage21Pipeline._unpack_latents(packed, height, width, 16)[:, :, 0]
    assert torch.equal(pipeline_to_taesd(packed, "taeqi2_1", height=height, width=width), theirs)
    z = torch.randn(1, 64, 6, 10)
    assert torch.equal(taesd_to_pipeline(z, "taeqi2_1"), QwenImage21Pipeline._pack_latents(z, 1, 64, 6, 10))


def _flux2_vae():
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(latent_channels=32, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                             down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    vae.bn.running_mean.copy_(torch.randn(128))
    vae.bn.running_var.copy_(torch.rand(128) * 3 + 0.1)
    return vae.eval()


def test_flux2_batchnorm_is_read_from_the_vae_and_taesd_gets_the_normalised_latent():
    vae = _flux2_vae()
    c = contract_for(vae, "taef2")
    assert c.source == "AutoencoderKLFlux2"
    raw = torch.randn(1, 32, 6, 10)
    # What the FLUX.2 pipeline does when it encodes an image (_encode_vae_image), then unpatchified:
    bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    normalised = (Flux2Pipeline._patchify_latents(raw) - vae.bn.running_mean.view(1, -1, 1, 1)) / bn_std
    z = raw_to_taesd(raw, c)
    assert torch.allclose(z, Flux2Pipeline._unpatchify_latents(normalised), atol=1e-6)
    assert torch.allclose(taesd_to_raw(z, c), raw, atol=1e-5)
    assert not torch.allclose(z, raw, atol=0.1)  # the statistics are not the identity


def test_families_with_per_channel_statistics_need_the_vae():
    with pytest.raises(TaesdError, match="BatchNorm"):
        raw_to_taesd(torch.randn(1, 32, 4, 4), "taef2")
    with pytest.raises(TaesdError, match="latents_mean"):
        taesd_to_raw(torch.randn(1, 64, 4, 4), "taeqi2_1")


def test_qwen_21_mean_std_round_trip_with_a_frame_axis():
    from dataclasses import replace
    c = replace(contract_for("taeqi2_1"), mean=torch.randn(64), std=torch.rand(64) + 0.5)
    raw = torch.randn(1, 64, 1, 4, 6)  # the video VAE's N x C x T x h x w
    z = raw_to_taesd(raw, c)
    assert z.shape == (1, 64, 4, 6)
    assert torch.allclose(taesd_to_raw(z, c), raw, atol=1e-5)


def test_variant_for_reads_the_vae_when_the_class_name_is_unknown():
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(latent_channels=16, block_out_channels=(8,), norm_num_groups=4, layers_per_block=1,
                        scaling_factor=1.5305, shift_factor=0.0609)
    assert variant_for(vae) == "taesd3"
    assert variant_for(_flux2_vae()) == "taef2"
    with pytest.raises(TaesdError, match="pass variant="):
        variant_for(object())


def test_square_guess_and_bad_sizes_fail_clearly():
    packed = torch.randn(1, 12, 64)  # 12 tokens: not a square
    with pytest.raises(TaesdError, match="not a square"):
        pipeline_to_taesd(packed, "taef1")
    with pytest.raises(TaesdError, match="latent tokens"):
        pipeline_to_taesd(packed, "taef1", height=64, width=64)
