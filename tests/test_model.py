"""The network: published parameter counts, shapes for every variant, real taef2 quality."""
import pytest
import torch

import taesd
from conftest import photo
from taesd.evaluation.metrics import psnr


@pytest.mark.parametrize("name", ["taesd", "taesdxl"])
def test_published_parameter_counts(name):
    model = taesd.create(name)
    assert taesd.count_parameters(model.encoder) == 1_222_532
    assert taesd.count_parameters(model.decoder) == 1_222_531


@pytest.mark.parametrize("name", list(taesd.VARIANTS))
def test_every_variant_encodes_and_decodes_with_the_right_shapes(name):
    v = taesd.get_variant(name)
    model = taesd.create(name)
    d = v.downscale
    images = torch.rand(2, v.image_channels, 2 * d, 3 * d)
    latents = model.encode(images)
    assert latents.shape == (2, v.latent_channels, 2, 3)
    out = model.decode(latents)
    assert out.shape == (2, v.image_channels, 2 * d, 3 * d)
    assert out.min() >= 0 and out.max() <= 1


def test_downscale_factors_match_the_architecture():
    assert taesd.get_variant("taesana").downscale == 32
    assert taesd.get_variant("taeqi2_1").downscale == 16
    assert taesd.get_variant("taeqi2_1").image_channels == 4


def test_rgb_into_the_rgba_variant_means_alpha_one():
    model = taesd.create("taeqi2_1")
    rgb = torch.rand(1, 3, 32, 32)
    rgba = torch.cat([rgb, torch.ones(1, 1, 32, 32)], 1)
    assert torch.equal(model.encode(rgb), model.encode(rgba))


def test_taef2_published_weights_round_trip_real_photos(taef2):
    for name, floor in [("astronaut", 30.5), ("chelsea", 32.0), ("coffee", 29.0)]:
        image = photo(name)[None]
        out = taef2.decode(taef2.encode(image))
        assert psnr(out, image).item() > floor, name


def test_taesana_encoder_real_weights_gives_32x_latents(weights):
    model = taesd.load("taesana", weights / "taesana_encoder.pth", device="cpu")
    assert model.parts == ("encoder",)
    z = model.encode(photo("astronaut", 256)[None])
    assert z.shape == (1, 32, 8, 8)
    assert z.abs().max() < 10 and z.std() > 0.1   # real latents, not noise from an empty model
    with pytest.raises(taesd.TaesdError, match="no decoder loaded"):
        model.decode(z)


def test_wrong_channel_counts_are_one_line_errors():
    model = taesd.create("taef2")
    with pytest.raises(taesd.TaesdError, match="decodes 32-channel latents, got 16 channels .*taesd3/taef1"):
        model.decode(torch.zeros(1, 16, 4, 4))
    with pytest.raises(taesd.TaesdError, match="encodes 3-channel images, got 1"):
        model.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(taesd.TaesdError, match="not a multiple of 8"):
        model.encode(torch.zeros(1, 3, 20, 16))


def test_encode_image_pads_any_size_and_decode_crops_back():
    model = taesd.create("taesd", seed=0)
    image = torch.rand(3, 37, 50)                    # neither side a multiple of 8
    latents, size = taesd.encode_image(model, image)
    assert size == (37, 50) and latents.shape == (1, 4, 5, 7)
    # The padding repeats edge pixels: the same latents as padding by hand.
    padded, _ = taesd.pad_to_multiple(image[None], 8)
    assert torch.equal(latents, model.encode(padded))
    out = model.decode(latents, size=size)
    assert out.shape == (1, 3, 37, 50)
    assert torch.equal(out, model.decode(latents)[..., :37, :50])
    batch, size = taesd.encode_image(model, torch.rand(2, 3, 16, 9), tile_size=1)
    assert batch.shape == (2, 4, 2, 2) and size == (16, 9)


def test_decode_size_must_fit_the_latents():
    model = taesd.create("taesd", seed=0, parts="decoder")
    z = torch.zeros(1, 4, 2, 3)
    assert model.decode(z, size=(16, 24)).shape[-2:] == (16, 24)    # the whole image is a size too
    for bad in [(17, 24), (0, 5), (8,), "8x8", (8.5, 8)]:
        with pytest.raises(taesd.TaesdError, match="at most the decoded 16x24"):
            model.decode(z, size=bad)


def test_small_calls_never_probe_free_memory(monkeypatch):
    """A 64 x 64 decode reads neither /proc/meminfo nor the cgroup files; a pass estimated above
    the probe bound does (once), so automatic tiling still protects large inputs."""
    from taesd import tiling
    from taesd.tiling import memory, runner
    probes = []
    real = memory.available_bytes
    monkeypatch.setattr(memory, "available_bytes", lambda: probes.append(1) or real())
    model = taesd.create("taesd", seed=0, parts="decoder")
    assert model.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 64, 64)
    assert probes == []
    an = tiling.analyse(model, "decoder")
    big = tiling.Pass(1, 256, 256, 4, 3, overhead=1.2)
    assert tiling.estimate_peak(an, big) > runner.PROBE_ABOVE
    tiling.choose_plan(an, big, torch.device("cpu"))
    assert probes == [1]


def test_decoded_images_are_clamped_to_0_1_tiled_cropped_or_not():
    """The decoder's output is clamped after it is converted to the model's dtype and layout: red
    pushed above 1 and green below 0 come back as exactly 1 and 0, tiled and cropped alike."""
    model = taesd.create("taesd", seed=0)
    with torch.no_grad():
        model.decoder[-1].bias.copy_(torch.tensor([8.0, -8.0, 0.0]))
    z = torch.randn(1, 4, 16, 24)
    out = model.decode(z)
    assert out.is_contiguous() and out.dtype == torch.float32
    assert (out[:, 0] == 1).all() and (out[:, 1] == 0).all() and 0 <= out.min() and out.max() <= 1
    tiled = model.decode(z, tile_size=8)   # the plain network: tiles within fp32 rounding
    assert (tiled[:, 0] == 1).all() and (tiled[:, 1] == 0).all() and (tiled - out).abs().max() <= 1e-5
    assert torch.equal(model.decode(z, size=(100, 150)), out[..., :100, :150].contiguous())
