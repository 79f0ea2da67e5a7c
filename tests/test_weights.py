"""Weights I/O: every format, detection from shapes, conversion round trips, diffusers parity,
hub cache resolution, and the errors a user meets."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import taesd
from conftest import ROOT
from taesd.cli import main
from taesd.io.weights.layouts import FORMATS
from taesd.io.weights.source import read_source
from taesd.io.weights.write import save_weights, state_dicts


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def fresh_parts(name, dtype=torch.float16):
    model = taesd.create(name, seed=1)
    return {p: {k: t.to(dtype) for k, t in sd.items()} for p, sd in state_dicts(model).items()}


@pytest.mark.parametrize("name", ["taesd", "taesd3", "taef2", "taesana", "taeqi2_1"])
def test_every_format_round_trips_bit_exactly(tmp_path, name):
    parts = fresh_parts(name)
    formats = [f for f in FORMATS if f != "diffusers" or taesd.get_variant(name).arch == "base"]
    if name == "taesana":   # ComfyUI has no Sana network: refused (test_weights_guards.py)
        formats.remove("comfyui")
    for fmt in formats:
        written = save_weights(parts, name, fmt, tmp_path / fmt)
        got = {}
        for path in {w.parent if w.name in ("config.json", "diffusion_pytorch_model.safetensors") else w
                     for w in written}:
            src = read_source(path)
            assert src.format == fmt
            got.update(src.parts)
        assert _same(got["encoder"], parts["encoder"]) and _same(got["decoder"], parts["decoder"]), fmt
        model = taesd.load(name, tmp_path / fmt, device="cpu")
        assert model.parts == ("encoder", "decoder") and model.weights_info["decoder"]["format"] == fmt


def test_convert_cli_chain_is_bit_exact_on_real_weights(tmp_path, weights, capsys):
    original = {p: read_source(weights / f"taef2_{p}.pth").parts[p] for p in ("encoder", "decoder")}
    assert main(["convert", str(weights / "taef2_encoder.pth"), str(weights / "taef2_decoder.pth"),
                 "--to", "safetensors", "-o", str(tmp_path / "st")]) == 0
    assert main(["convert", str(tmp_path / "st" / "taef2_encoder.safetensors"),
                 str(tmp_path / "st" / "taef2_decoder.safetensors"),
                 "--to", "comfyui", "-o", str(tmp_path / "taef2.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "taef2.safetensors"), "--to", "pth", "-o", str(tmp_path / "pth")]) == 0
    for p in ("encoder", "decoder"):
        back = torch.load(tmp_path / "pth" / f"taef2_{p}.pth", weights_only=True)
        assert _same(back, original[p])
    # and the diffusers format says clearly why it cannot hold taef2
    assert main(["convert", str(tmp_path / "taef2.safetensors"), "--to", "diffusers", "-o", str(tmp_path / "d")]) == 2
    assert "cannot hold taef2" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_convert_needs_variant_when_shapes_fit_two(tmp_path, capsys):
    save_weights(fresh_parts("taesd"), "taesd", "pth", tmp_path / "w")
    (tmp_path / "w" / "taesd_encoder.pth").rename(tmp_path / "w" / "enc.pth")
    assert main(["convert", str(tmp_path / "w" / "enc.pth"), "--to", "safetensors", "-o", str(tmp_path / "o")]) == 2
    assert "pass --variant taesd or --variant taesdxl" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "w" / "enc.pth"), "--to", "safetensors", "--variant", "taesdxl",
                 "-o", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "taesdxl_encoder.safetensors").is_file()


@pytest.mark.parametrize("name,channels", [("taesd", 4), ("taesd3", 16)])
def test_diffusers_autoencoder_tiny_loads_and_matches(tmp_path, name, channels):
    from diffusers import AutoencoderTiny
    torch.manual_seed(3)
    ref = AutoencoderTiny(latent_channels=channels).eval()
    ref.save_pretrained(tmp_path / "vae")
    model = taesd.load(name, tmp_path / "vae", device="cpu")
    assert model.weights_info["encoder"]["format"] == "diffusers"
    images = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        ref_latents = ref.encode(images * 2 - 1).latents
        ours = model.encode(images)
        assert (ours - ref_latents).abs().max() <= 1e-5
        ref_images = (ref.decode(ref_latents).sample + 1) / 2
    assert (model.run_part("decoder", ours) - ref_images).abs().max() <= 1e-5
    assert (model.decode(ours) - ref_images.clamp(0, 1)).abs().max() <= 1e-5


def test_a_file_of_another_variant_is_named_in_the_error(weights):
    with pytest.raises(taesd.TaesdError) as e:
        taesd.load("taesd3", weights / "taef2_decoder.pth")
    assert "holds a 32-channel decoder (taef2); taesd3 needs a 16-channel decoder" in str(e.value)
    with pytest.raises(taesd.TaesdError, match="holds a 32-channel encoder .taef2., not the taef2 decoder"):
        taesd.load("taef2", weights / "taef2_encoder.pth", parts="decoder")


def test_weights_env_folder_and_explicit_folder(weights, monkeypatch):
    monkeypatch.setenv("TAESD_WEIGHTS", str(weights))
    model = taesd.load("taef2", device="cpu")
    assert model.weights_info["decoder"]["sha256"].startswith("0a44a31e")
    monkeypatch.delenv("TAESD_WEIGHTS")
    with pytest.raises(taesd.TaesdError, match="no weights found for the taef2 encoder: put taef2_encoder.pth"):
        taesd.load("taef2")


def _hub_cache(root: Path, repo: str, commit: str, files: dict[str, Path]):
    """A Hugging Face cache as huggingface_hub lays it out: blobs named by their sha256 (the hub's ETag
    for LFS files, what taesd checks them against) and snapshot links to them."""
    import hashlib
    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "blobs").mkdir(exist_ok=True)
    for name, src in files.items():
        data = src.read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text(commit)


def test_hub_path_from_a_prepopulated_cache_offline(tmp_path):
    from diffusers import AutoencoderTiny
    torch.manual_seed(4)
    AutoencoderTiny(latent_channels=16).save_pretrained(tmp_path / "v1")
    torch.manual_seed(5)
    AutoencoderTiny(latent_channels=16).save_pretrained(tmp_path / "v2")
    files = lambda d: {n: d / n for n in ("config.json", "diffusion_pytorch_model.safetensors")}
    old, new = "a" * 40, "b" * 40
    _hub_cache(tmp_path / "hub", "madebyollin/taef1", old, files(tmp_path / "v1"))
    _hub_cache(tmp_path / "hub2", "madebyollin/taef1", new, files(tmp_path / "v2"))
    # second revision in the same cache: refs/main points at the newest
    snap = tmp_path / "hub" / "models--madebyollin--taef1" / "snapshots" / new
    (tmp_path / "hub2" / "models--madebyollin--taef1" / "snapshots" / new).rename(snap)
    for blob in (tmp_path / "hub2" / "models--madebyollin--taef1" / "blobs").iterdir():
        blob.rename(tmp_path / "hub" / "models--madebyollin--taef1" / "blobs" / blob.name)
    (tmp_path / "hub" / "models--madebyollin--taef1" / "refs" / "main").write_text(new)
    code = ("import taesd, sys; m = taesd.load('taef1', device='cpu', revision=sys.argv[1] or None); "
            "print(m.weights_info['decoder']['sha256'], m.weights_info['decoder']['path'])")
    env = {k: v for k, v in os.environ.items() if k != "TAESD_WEIGHTS"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=str(ROOT / "src"))
    out = {}
    for rev in ("", old):
        r = subprocess.run([sys.executable, "-c", code, rev], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out[rev] = r.stdout.split()
    assert new in out[""][1] and old in out[old][1]
    assert out[""][0] != out[old][0]          # the sha256 tells the two published versions apart
    r = subprocess.run([sys.executable, "-m", "taesd", "info", "--variant", "taef1", "--revision", old],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and out[old][0] in r.stdout and "16-channel decoder (taesd3/taef1)" in r.stdout
    # nothing in the cache for another variant: a clear error, no network
    r = subprocess.run([sys.executable, "-c", "import taesd; taesd.load('taesdxl')"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no weights found for the taesdxl encoder" in r.stderr


def test_info_cli_lists_variants_and_file_contents(weights, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in taesd.VARIANTS:
        assert name in out
    assert main(["info", str(weights / "taesana_encoder.pth")]) == 0
    out = capsys.readouterr().out
    assert "32-channel encoder (taesana)" in out and "858f4e4cc293" in out and "1,256,288 parameters" in out
