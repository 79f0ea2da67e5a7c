"""Garbage in is refused in one line: non-finite or mis-scaled inputs, bad weights, contradicting
latent metadata; other programs' files (ComfyUI, diffusers .bin / fp16 variant) read right."""
import json
import warnings

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file

import taesd
from taesd.errors import TaesdError
from taesd.io.latents import load_latents, save_latents
from taesd.io.weights.formats import (
    diffusers_config,
    read_source,
    save_weights,
    state_dicts,
    to_diffusers_keys,
)


@pytest.fixture(scope="module")
def model():
    return taesd.create("taesd", seed=0)


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_non_finite_latents_and_images_refused(model):
    z = torch.randn(1, 4, 8, 8)
    z[0, 1, 2, 3] = float("nan")
    with pytest.raises(TaesdError) as e:
        model.decode(z)
    assert "NaN" in one_line(e) and "(0, 1, 2, 3)" in str(e.value)
    img = torch.rand(1, 3, 64, 64)
    img[0, 0, 0, 0] = float("inf")
    with pytest.raises(TaesdError, match="infinite"):
        model.encode(img)


def test_empty_inputs_refused(model):
    with pytest.raises(TaesdError, match="empty"):
        model.decode(torch.zeros(1, 4, 0, 8))
    with pytest.raises(TaesdError, match="empty"):
        model.encode(torch.zeros(0, 3, 64, 64))


def test_uint8_and_out_of_range_images_refused(model):
    pixels = (torch.rand(1, 3, 64, 64) * 255).to(torch.uint8)
    with pytest.raises(TaesdError, match="255"):
        model.encode(pixels)
    with pytest.raises(TaesdError, match="divide by 255"):
        model.encode(pixels.float())
    with pytest.raises(TaesdError, match=r"\(images \+ 1\) / 2"):
        model.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    model.encode(torch.rand(1, 3, 64, 64) * 1.2 - 0.1)   # slight overshoot is fine


@pytest.mark.parametrize("bad", ["int", "bool", "nan", "inf"])
def test_bad_weight_tensors_refused_naming_file_and_tensor(model, tmp_path, bad):
    sd = dict(state_dicts(model)["decoder"])
    key = "3.conv.0.weight"
    if bad in ("int", "bool"):
        sd[key] = (sd[key] > 0).to(torch.int32 if bad == "int" else torch.bool)
    else:
        sd[key] = sd[key].clone()
        sd[key][0, 0, 0, 0] = float(bad)
    path = tmp_path / "taesd_decoder.safetensors"
    save_file(sd, str(path))
    with pytest.raises(TaesdError) as e:
        read_source(path)
    assert str(path) in one_line(e) and key in str(e.value)


def _png_latent(tmp_path, model, meta_overrides: dict):
    lat = model.encode(torch.rand(1, 3, 64, 96))
    path = save_latents(tmp_path / "x.png", lat, "taesd", image_size=(60, 90))
    with Image.open(path) as im:
        text = dict(im.text)
        arr = im.copy()
    text.update(meta_overrides)
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    arr.save(path, pnginfo=info)
    return path


def test_latent_metadata_checked_against_the_tensor(model, tmp_path):
    assert load_latents(_png_latent(tmp_path, model, {}))[2] == (60, 90)
    # another variant named: taef2 has 32 channels, the stored shape says 4
    with pytest.raises(TaesdError, match="shape"):
        load_latents(_png_latent(tmp_path, model, {"taesd_variant": "taesd3"}))
    for size in ("[-8, 90]", "[0, 90]", "[65, 90]", "[40, 90]", "[60]"):
        with pytest.raises(TaesdError, match="image size"):
            load_latents(_png_latent(tmp_path, model, {"taesd_image_size": size}))
    for key, junk in (("taesd_image_size", "sixty"), ("taesd_shape", "{}"), ("taesd_variant", "nope")):
        with pytest.raises(TaesdError) as e:
            load_latents(_png_latent(tmp_path, model, {key: junk}))
        one_line(e)


def test_empty_latent_file_refused(tmp_path):
    path = tmp_path / "z.safetensors"
    save_file({"latents": torch.zeros(1, 4, 0, 3)}, str(path), metadata={"variant": "taesd"})
    with pytest.raises(TaesdError, match="empty"):
        load_latents(path)


def test_comfyui_taef2_writes_the_per_part_files(tmp_path):
    f2 = taesd.create("taef2", seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = save_weights(state_dicts(f2), "taef2", "comfyui", tmp_path / "taef2.safetensors")
    names = ["taef2_encoder.safetensors", "taef2_decoder.safetensors", "taef2.safetensors"]
    assert [p.name for p in written] == names
    assert any("per-part" in str(w.message) for w in caught)
    assert any(".pool." in k for k in load_file(written[1]))   # the pool branch is kept
    # the one file is not claimed by ComfyUI's one-file TAESD loader (no taesd_ keys), taesd reads it
    assert not any(k.startswith("taesd_") for k in load_file(written[2]))
    assert set(read_source(written[2]).parts) == {"encoder", "decoder"}


def test_per_channel_scale_shift_read_and_written(tmp_path):
    q = taesd.create("taeqi2_1", seed=0)
    (path,) = save_weights(state_dicts(q), "taeqi2_1", "comfyui", tmp_path)
    stored = load_file(path)
    assert stored["vae_scale"].shape == (64, 1, 1) and stored["vae_shift"].shape == (64, 1, 1)
    stored["vae_scale"] = torch.linspace(0.5, 1.5, 64).reshape(64, 1, 1)
    save_file(stored, str(path))
    src = read_source(path)
    assert len(src.extras["vae_scale"]) == 64 and src.extras["vae_scale"][-1] == pytest.approx(1.5)
    (again,) = save_weights(src.parts, "taeqi2_1", "comfyui", tmp_path / "again.safetensors", src.extras)
    assert torch.equal(load_file(again)["vae_scale"], stored["vae_scale"])
    stored["vae_scale"] = torch.ones(3, 4)
    save_file(stored, str(path))
    with pytest.raises(TaesdError, match="vae_scale"):
        read_source(path)


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors"])
def test_diffusers_bin_and_fp16_variant_folders(model, tmp_path, name):
    tensors = {k: t.half() for k, t in to_diffusers_keys(state_dicts(model)).items()}
    if name.endswith(".bin"):
        torch.save(tensors, tmp_path / name)
    else:
        save_file(tensors, str(tmp_path / name))
    (tmp_path / "config.json").write_text(json.dumps(diffusers_config(model.variant)))
    src = read_source(tmp_path)
    assert src.format == "diffusers" and set(src.parts) == {"encoder", "decoder"}
    loaded = taesd.load("taesd", weights=tmp_path)
    z = torch.randn(1, 4, 8, 8)
    ref = taesd.create("taesd", seed=0)
    ref.load_state_dict({k: v.half().float() for k, v in ref.state_dict().items()})
    assert (loaded.decode(z) - ref.decode(z)).abs().max() < 1e-4
