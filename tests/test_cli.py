"""The command line as a user meets it: the published quality on a real photo, many files at once,
and every kind of bad input failing with one line and no output file."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import taesd
from conftest import ROOT
from taesd.cli import main


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory):
    import skimage.data as data
    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


def _psnr(out: str) -> float:
    return float(out.split("PSNR ")[1].split(" dB")[0])


def test_roundtrip_astronaut_taef2_and_8bit_latents(astronaut, weights, tmp_path, capsys):
    w = ["--weights", str(weights)]
    assert main(["roundtrip", str(astronaut), "--variant", "taef2", *w, "-o", str(tmp_path / "rt.png")]) == 0
    exact = _psnr(capsys.readouterr().out)
    assert main(["roundtrip", str(astronaut), "--variant", "taef2", *w, "--latents", "png",
                 "-o", str(tmp_path / "rt8.png")]) == 0
    eight_bit = _psnr(capsys.readouterr().out)
    assert exact >= 29 and exact - eight_bit < 0.2
    assert Image.open(tmp_path / "rt.png").size == (512, 512)


def test_encode_decode_folder_through_png_latents_restores_odd_sizes(weights, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(37, 50), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(src / f"img{i}.png")
    assert main(["encode", str(src), "--variant", "taef2", "--weights", str(weights), "--format", "png",
                 "-o", str(tmp_path / "lat")]) == 0
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == ["img0.taef2.png", "img1.taef2.png"]
    assert main(["decode", str(tmp_path / "lat"), "--weights", str(weights), "-o", str(tmp_path / "dec")]) == 0
    assert Image.open(tmp_path / "dec" / "img0.decoded.png").size == (50, 37)
    assert Image.open(tmp_path / "dec" / "img1.decoded.png").size == (64, 64)


def test_installed_entry_point_help_has_examples():
    for cmd in ([], ["encode"], ["decode"], ["roundtrip"], ["info"], ["convert"]):
        r = subprocess.run([sys.executable, "-m", "taesd", *cmd, "--help"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=120)
        assert r.returncode == 0 and "example" in r.stdout, cmd


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _bad_inputs(tmp: Path, weights: Path):
    """(name, argv) pairs that must each fail with one line."""
    good = weights / "taef2_decoder.pth"
    (tmp / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save([1, 2, 3], tmp / "list.pth")
    with open(tmp / "evil.pth", "wb") as f:
        pickle.dump({"0.weight": _RunsCode()}, f)
    torch.save({"hello": _RunsCode()}, tmp / "evil2.pth")
    (tmp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "emptydir").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp / "ok.png")
    taesd.save_latents(tmp / "sd3.safetensors", torch.zeros(1, 16, 2, 2), "taesd3")
    out = str(tmp / "out" / "x.png")
    dec = ["decode", "-o", out]
    return [
        ("truncated weights", ["roundtrip", str(tmp / "ok.png"), "-v", "taef2", "-w", str(tmp / "truncated.pth"),
                               "-w", str(weights / "taef2_encoder.pth"), "-o", out], "damaged"),
        ("not a state dict", ["roundtrip", str(tmp / "ok.png"), "-v", "taef2", "-w", str(tmp / "list.pth"), "-o", out],
         "not a state dict"),
        ("pickle running code", ["info", str(tmp / "evil.pth")], "refusing to load"),
        ("pickle running code (torch.save)", ["info", str(tmp / "evil2.pth")], "refusing to load"),
        ("wrong variant", ["roundtrip", str(tmp / "ok.png"), "-v", "taesd3", "-w", str(weights), "-o", out],
         "no taesd3 encoder weights in"),
        ("wrong variant file", ["roundtrip", str(tmp / "ok.png"), "-v", "taesd3", "-w", str(good), "-o", out],
         "holds a 32-channel decoder (taef2); taesd3 needs a 16-channel decoder"),
        ("wrong latent channels", [*dec, str(tmp / "sd3.safetensors"), "-v", "taef2", "-w", str(weights)],
         "taef2 needs 32"),
        ("corrupt image", ["roundtrip", str(tmp / "corrupt.png"), "-v", "taef2", "-w", str(weights), "-o", out],
         "cannot read image"),
        ("empty image", ["encode", str(tmp / "empty.png"), "-v", "taef2", "-w", str(weights), "-o", out],
         "is empty"),
        ("empty folder", ["encode", str(tmp / "emptydir"), "-v", "taef2", "-w", str(weights), "-o", out],
         "holds no image files"),
        ("missing path", ["encode", str(tmp / "nope.png"), "-v", "taef2", "-w", str(weights), "-o", out],
         "does not exist"),
        ("missing weights", ["encode", str(tmp / "ok.png"), "-v", "taef2", "-w", str(tmp / "nope.pth"), "-o", out],
         "does not exist"),
    ]


def test_bad_input_fails_with_one_line_and_no_output(tmp_path, weights):
    for name, argv, expect in _bad_inputs(tmp_path, weights):
        r = subprocess.run([sys.executable, "-m", "taesd", *argv], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        assert r.returncode == 2, (name, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], (name, r.stderr)
        assert "Traceback" not in r.stderr and "pwned" not in r.stdout
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), name


def test_every_file_gets_a_result_line_and_decode_reports_the_original_size(weights, tmp_path, capsys):
    """A batch prints one line per file also into a log (stdout not a terminal); a single decode
    names the size it wrote (the original 451 x 300, not the padded 456 x 304)."""
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)).save(src / f"p{i}.png")
    w = ["--weights", str(weights)]
    assert main(["encode", str(src), "-v", "taef2", *w, "-o", str(tmp_path / "lat")]) == 0
    out = capsys.readouterr().out
    assert [line.split(" -> ")[0] for line in out.splitlines()] == [str(src / "p0.png"), str(src / "p1.png")]
    assert main(["decode", str(tmp_path / "lat"), *w, "-o", str(tmp_path / "dec")]) == 0
    assert capsys.readouterr().out.count("(451x300)") == 2
    assert main(["decode", str(tmp_path / "lat" / "p0.taef2.safetensors"), *w,
                 "-o", str(tmp_path / "one.png")]) == 0
    assert capsys.readouterr().out.strip().endswith("(451x300)")
    assert Image.open(tmp_path / "one.png").size == (451, 300)


def test_output_names_and_the_input_skipper_agree():
    """The writers' names (io.naming) are exactly what the input collector recognises as outputs."""
    from taesd.io import naming
    for variant in taesd.VARIANTS:
        assert naming.is_latent_png_name(naming.latent_name("a.b", variant, "png"))
        assert naming.is_output_image_name(naming.roundtrip_name("a.b", variant))
        for n in (1, 3):
            assert all(naming.is_output_image_name(x)
                       for x in naming.decoded_names(naming.latent_name("a.b", variant, "png")[:-4], variant, n))
    assert naming.decoded_names("photo.taef2", "taef2", 1) == ["photo.decoded.png"]
    assert not naming.is_output_image_name("photo.png") and not naming.is_latent_png_name("photo.v2.png")


def test_images_taesd_writes_carry_its_marker_in_every_format(tmp_path):
    from taesd.io.naming import has_taesd_marker
    image = torch.rand(3, 16, 16)
    for suffix in (".png", ".jpg", ".webp", ".gif", ".tiff"):
        taesd.save_image(image, tmp_path / f"a{suffix}")
        assert has_taesd_marker(tmp_path / f"a{suffix}"), suffix
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / f"user{suffix}")
        assert not has_taesd_marker(tmp_path / f"user{suffix}"), suffix


def test_bench_never_writes_a_tracked_file_and_asks_before_replacing(tmp_path, capsys, monkeypatch):
    from taesd.cli import bench
    assert main(["bench", "-o", str(ROOT / "benchmarks" / "RESULTS.md")]) == 2
    assert "a file the checkout tracks" in capsys.readouterr().err
    (tmp_path / "mine.md").write_text("earlier")
    assert main(["bench", "-o", str(tmp_path / "mine.md")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "mine.md").read_text() == "earlier"
    assert bench.report_target(["--sizes", "64"]) == (["--sizes", "64", "-o", "taesd-bench.md"],
                                                       Path("taesd-bench.md"), False)
    monkeypatch.setattr(bench, "SCRIPT", tmp_path / "no" / "bench_speed.py")   # an installed package
    assert main(["bench"]) == 2
    assert "clone the taesd repository" in capsys.readouterr().err


def test_python_api_errors_are_one_line():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(taesd.TaesdError, match=r"device='cuda': .*use device='cpu'"):
        taesd.load("taef2", device="cuda")
    code = ("import sys; sys.modules.update(dict.fromkeys(['diffusers', 'onnx', 'onnxscript']))\n"
            "import taesd\n"
            "for get in (lambda: taesd.TaesdVAE, lambda: __import__('taesd.export.onnx', fromlist=['x'])"
            ".to_onnx(taesd.create('taesd'), 'decoder')):\n"
            "    try:\n        get()\n    except taesd.TaesdError as e:\n        print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["this needs diffusers, which is not installed: pip install 'taesd[diffusers]'",
                                     "this needs onnx, which is not installed: pip install 'taesd[onnx]'"]


def test_the_command_list_is_every_command_module():
    """COMMANDS is kept by hand: every taesd/cli/<name>.py with add_parser and run is in it, and only those."""
    import importlib
    import pkgutil

    import taesd.cli as cli
    modules = {m.name for m in pkgutil.iter_modules(cli.__path__)}
    commands = {n for n in modules
                if hasattr(importlib.import_module(f"taesd.cli.{n}"), "add_parser")
                and hasattr(importlib.import_module(f"taesd.cli.{n}"), "run")}
    assert commands == set(cli.COMMANDS) and len(cli.COMMANDS) == len(set(cli.COMMANDS))


def test_top_level_commands_take_videos_and_taehv_variants(tmp_path, capsys):
    """`taesd roundtrip clip.mp4 --variant taew2_1` (and encode, decode, info) run the `taesd video` path
    on a clip of real photos (pans and zooms of scikit-image images); an image variant on a video is
    refused with one line."""
    pytest.importorskip("av")
    from taesd.evaluation.video import photo_clip
    from taesd.io.video import read_video, write_video
    from taesd.video import TAEHV
    torch.manual_seed(0)
    weights = tmp_path / "taew2_1.pth"
    torch.save(TAEHV("taew2_1").state_dict(), weights)
    clip = photo_clip(frames=9, size=(64, 96))
    src = write_video(tmp_path / "clip.mp4", clip.frames, fps=16)
    assert main(["roundtrip", str(src), "--variant", "taew2_1", "-w", str(weights), "--chunk", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("PSNR") == 10 and "flicker" in out          # 9 frames + the summary
    rt = tmp_path / "clip.taew2_1.roundtrip.mp4"
    assert read_video(rt).frames.shape == clip.frames.shape
    assert main(["roundtrip", str(src), "--variant", "taew2_1", "-w", str(weights)]) == 2   # no clobbering
    assert "exists" in capsys.readouterr().err
    tiled = tmp_path / "tiled.mp4"       # seam-exact spatial tiles: the same frames, the same figures
    assert main(["roundtrip", str(src), "-v", "taew2_1", "-w", str(weights), "--tile-size", "4", "-o", str(tiled)]) == 0
    assert capsys.readouterr().out == out

    assert main(["encode", str(src), "--variant", "taew2_1", "-w", str(weights)]) == 0
    latents = tmp_path / "clip.taew2_1.safetensors"
    assert main(["decode", str(latents), "-w", str(weights), "-o", str(tmp_path / "dec")]) == 0   # variant
    assert read_video(tmp_path / "dec").frames.shape == clip.frames.shape                          # from file

    assert main(["decode", str(latents), "-v", "taef2"]) == 2          # an image variant on TAEHV latents
    assert "drop --variant" in capsys.readouterr().err
    assert main(["info", str(src), str(weights), str(latents)]) == 0
    out = capsys.readouterr().out
    assert "9 frames of 96x64" in out and "taew2_1" in out and "Qwen Image" in out and "1x3x16x8x12" in out
    assert main(["info"]) == 0 and "Krea 2" in capsys.readouterr().out
    assert main(["info", "--variant", "taew2_1"]) == 0 and "madebyollin/taehv@" in capsys.readouterr().out

    assert main(["roundtrip", str(src), "--variant", "taef2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "TAEHV variant" in err
