"""taesd eval: its numbers for the published taef2 on scikit-image photos equal a direct
computation with scikit-image's own metrics; the table, CSV, JSON and grid are written."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import taesd
from taesd.cli import main

PHOTOS = ["astronaut", "coffee", "camera"]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    import skimage.data
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        Image.fromarray(arr[:100, :124]).save(folder / f"{name}.png")  # odd sizes: padding is exercised
    return folder


def direct(model, path):
    """Round trip by hand: pad with edge pixels, encode, (quantize), decode, crop, skimage metrics."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    h, w = arr.shape[:2]
    padded = np.pad(arr, ((0, -h % 8), (0, -w % 8), (0, 0)), mode="edge")
    x = torch.from_numpy(padded).permute(2, 0, 1)[None]
    with torch.no_grad():
        lat = model.encoder(x)
        lat8 = torch.from_numpy(np.round(np.clip(lat.numpy() / 6 + 0.5, 0, 1) * 255) / 255 - 0.5) * 6
        out = {}
        for key, z in (("", lat), ("_8bit", lat8.float())):
            y = model.decoder(z).clamp(0, 1)[0].permute(1, 2, 0).numpy()[:h, :w]
            y = y.astype(np.float64)
            out["psnr" + key] = peak_signal_noise_ratio(arr.astype(np.float64), y, data_range=1)
            out["ssim" + key] = structural_similarity(arr.astype(np.float64), y, channel_axis=2, data_range=1,
                                                      gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    return out


def test_eval_matches_direct_computation(photo_dir, tmp_path, weights, capsys):
    out = tmp_path / "eval"
    assert main(["eval", str(photo_dir), "--variant", "taef2", "--weights", str(weights), "--teacher", "taef2",
                 "-o", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| Model | PSNR | SSIM | PSNR 8-bit latents" in printed and "+/-" in printed
    with open(out / "eval.csv") as f:
        rows = {(r["model"], r["file"].rsplit("/", 1)[-1]): r for r in csv.DictReader(f)}
    model = taesd.load("taef2", weights, device="cpu")
    expected = {name: direct(model, photo_dir / f"{name}.png") for name in PHOTOS}
    for name in PHOTOS:
        row = rows[("taef2", f"{name}.png")]
        for key, value in expected[name].items():
            assert float(row[key]) == pytest.approx(value, abs=2e-3 if key.startswith("psnr") else 2e-5), (name, key)
        assert float(row["latent_mse"]) == 0  # the teacher is taef2 itself
        assert float(rows[("teacher:taef2", f"{name}.png")]["psnr"]) == pytest.approx(expected[name]["psnr"], abs=2e-3)
    summary = json.loads((out / "eval.json").read_text())["summary"]["taef2"]
    psnrs = [expected[n]["psnr"] for n in PHOTOS]
    assert summary["psnr"]["mean"] == pytest.approx(np.mean(psnrs), abs=2e-3)
    assert summary["psnr"]["std"] == pytest.approx(np.std(psnrs), abs=2e-3)
    assert f"{np.mean(psnrs):.2f} +/- {np.std(psnrs):.2f}" in printed
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * 124, 3 * 100)  # columns: image, teacher, taef2; one row per photo


def test_eval_bad_input_is_one_line_error(photo_dir, capsys):
    assert main(["eval", str(photo_dir), "--variant", "nope"]) == 2
    assert "unknown variant 'nope'" in capsys.readouterr().err
    assert main(["eval", str(photo_dir / "missing.png"), "--variant", "taef2"]) == 2
    assert "does not exist" in capsys.readouterr().err
