"""Images in any PIL mode, the padding rule, and latent files (exact and 8-bit PNG)."""
import numpy as np
import pytest
import torch
from PIL import Image

import taesd
from taesd.io.images import crop_to, pil_to_tensor
from taesd.io.latents import dequantize, from_png_array, quantize, to_png_array


def test_pil_modes_become_rgb_or_rgba():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8))
    ref = pil_to_tensor(rgb)
    assert ref.shape == (3, 9, 7)
    for mode in ("L", "LA", "P", "RGBA", "CMYK"):
        x = pil_to_tensor(rgb.convert(mode))
        assert x.shape == (3, 9, 7) and 0 <= x.min() and x.max() <= 1, mode
    assert torch.equal(pil_to_tensor(rgb.convert("RGBA")), ref)       # alpha dropped, colours kept
    grey = pil_to_tensor(rgb.convert("L"))
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    rgba = pil_to_tensor(rgb, channels=4)
    assert rgba.shape == (4, 9, 7) and torch.all(rgba[3] == 1)


def test_16_bit_images_keep_their_precision(tmp_path):
    arr = np.array([[0, 1000, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    x = taesd.load_image(tmp_path / "deep.png")
    assert x.shape == (3, 1, 3)
    assert torch.allclose(x[0, 0], torch.tensor([0, 1000 / 65535, 1.0]))


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert taesd.load_image(tmp_path / "rotated.jpg").shape == (3, 40, 20)


def test_odd_sizes_pad_then_crop_back(tmp_path):
    image = torch.rand(3, 37, 50)
    padded, size = taesd.pad_to_multiple(image, 8)
    assert padded.shape == (3, 40, 56) and size == (37, 50)
    assert torch.equal(padded[:, 36:, :50], image[:, 36:37].expand(3, 4, 50))   # edge repeated
    assert torch.equal(crop_to(padded, size), image)


def test_png_layout_stacks_4_channel_tiles_vertically():
    z = torch.linspace(-2.9, 2.9, 16 * 3 * 5).reshape(16, 3, 5)
    arr = to_png_array(z)
    assert arr.shape == (4 * 3, 5, 4)
    # channels 4..7 are the second tile from the top
    assert np.array_equal(arr[3:6, :, 1], quantize(z[5]).numpy())
    back = from_png_array(arr, 16)
    assert (back - z).abs().max() <= 6 / 255 / 2 + 1e-6
    assert torch.equal(dequantize(quantize(back)), back)


@pytest.mark.parametrize("suffix", [".safetensors", ".png"])
def test_latent_files_record_variant_and_size(tmp_path, suffix):
    z = torch.randn(1, 32, 6, 5).clamp(-3, 3)
    path = taesd.save_latents(tmp_path / f"z{suffix}", z if suffix == ".safetensors" else z[0], "taef2", (45, 40))
    back, v, size = taesd.load_latents(path)
    assert v.name == "taef2" and size == (45, 40) and back.shape == (1, 32, 6, 5)
    if suffix == ".safetensors":
        assert torch.equal(back, z)
    else:
        assert (back - z).abs().max() <= 3 / 255 + 1e-6


def test_png_without_metadata_needs_the_variant(tmp_path):
    z = torch.randn(16, 3, 4).clamp(-3, 3)
    Image.fromarray(to_png_array(z), "RGBA").save(tmp_path / "published.png")
    with pytest.raises(taesd.TaesdError, match="does not say which variant"):
        taesd.load_latents(tmp_path / "published.png")
    back, v, _ = taesd.load_latents(tmp_path / "published.png", "taesd3")
    assert back.shape == (1, 16, 3, 4) and v.name == "taesd3"
    with pytest.raises(taesd.TaesdError, match="no 32-channel latent"):
        taesd.load_latents(tmp_path / "published.png", "taef2")
