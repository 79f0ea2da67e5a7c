"""`taesd info` on pictures and latent PNGs: what they are and what to do, never "damaged"."""
import numpy as np
import torch
from PIL import Image

import taesd
from taesd.cli import main


def test_info_tells_a_photo_from_a_latent_png(tmp_path, capsys):
    import skimage.data as data
    photo = tmp_path / "cat.png"
    Image.fromarray(data.chelsea()).save(photo)
    latent = tmp_path / "cat.taef2.png"
    taesd.save_latents(latent, torch.rand(32, 38, 57) * 2 - 1, "taef2", (300, 451))
    assert main(["info", str(photo), str(latent)]) == 0
    out = capsys.readouterr().out
    assert "an image, not weights: 451x300 RGB" in out
    assert "latents: taef2" in out and "1x32x38x57" in out and "image size: 451x300" in out
    assert "damaged" not in out and np.asarray(Image.open(photo)).shape == (300, 451, 3)


def test_convert_comfyui_note_is_one_plain_line(tmp_path, capsys, weights, monkeypatch):
    import warnings
    monkeypatch.setenv("TAESD_WEIGHTS", str(weights))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a raw UserWarning would fail the test
        assert main(["convert", "taef2", "--to", "comfyui", "-o", str(tmp_path / "cf")]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note: ComfyUI reads taef2")]
    assert len(notes) == 1 and "UserWarning" not in err
    assert (tmp_path / "cf" / "taef2_decoder.safetensors").is_file()
