"""The core install (no extras): loading, encoding, decoding and the CLI round trip import no optional
package, and an optional feature without its extra fails with one line naming the extra.

Here the optional packages are hidden from a fresh interpreter (``sys.modules[name] = None``: an
import of them fails as if they were not installed). CI also builds a real core-only venv
(scripts/check_core_install.sh, run by .ci/run).
"""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

OPTIONAL = ["onnx", "onnxruntime", "onnxscript", "diffusers", "transformers", "accelerate", "tensorboard",
            "matplotlib", "skimage", "scipy", "psutil", "pytest", "sklearn", "pandas"]
HIDE = f"import sys; sys.modules.update(dict.fromkeys({OPTIONAL!r}))\n"


def run_core(code: str, tmp_path, weights) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TAESD_WEIGHTS": str(weights),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", HIDE + code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def photo_file(tmp_path):
    import skimage.data
    from PIL import Image
    Image.fromarray(skimage.data.chelsea()[:192, :256]).save(tmp_path / "chelsea.png")
    return tmp_path / "chelsea.png"


def test_load_encode_decode_and_cli_round_trip_need_no_optional_package(tmp_path, weights, photo_file):
    code = f"""
import taesd
from taesd.cli import COMMANDS, main
model = taesd.load("taef2")
image = taesd.load_image({str(photo_file)!r})
latents = model.encode(image[None])
decoded = model.decode(latents)
assert decoded.shape == image[None].shape and float(((decoded - image) ** 2).mean()) < 0.01
assert main(["roundtrip", {str(photo_file)!r}, "--variant", "taef2", "-o", "rt"]) == 0
assert main(["encode", {str(photo_file)!r}, "--variant", "taef2", "--format", "png", "-o", "lat"]) == 0
assert main(["decode", "lat", "-o", "dec"]) == 0
for cmd in COMMANDS:
    try:
        main([cmd, "--help"])
    except SystemExit as e:
        assert e.code == 0, cmd
loaded = sorted(m for m in {OPTIONAL!r} if sys.modules.get(m) is not None)
print("optional loaded:", loaded)
"""
    r = run_core(code, tmp_path, weights)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "optional loaded: []" in r.stdout
    assert (tmp_path / "rt").is_dir() and list((tmp_path / "dec").glob("*.png"))


@pytest.mark.parametrize("argv,extra", [
    (["export", "onnx", "--variant", "taef2", "-o", "onnx"], "onnx"),
    (["encode", "chelsea.png", "-v", "taef2", "--backend", "onnxruntime", "-o", "x.safetensors"], "onnx"),
])
def test_optional_features_name_their_extra_in_one_line(tmp_path, weights, photo_file, argv, extra):
    r = run_core(f"import sys; from taesd.cli import main; sys.exit(main({argv!r}))", tmp_path, weights)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]   # (progress bars aside)
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr
    assert errors[0].startswith("taesd ") and f"pip install 'taesd[{extra}]'" in errors[0]
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "x.safetensors").exists()


def test_core_dependencies_are_declared_and_pinned():
    """Every package the core path needs is a core dependency, and constraints.txt pins each."""
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower().replace("_", "-")
            for d in project["dependencies"]}
    assert core >= {"torch", "safetensors", "huggingface-hub", "pillow", "numpy", "tqdm"}
    assert not core & {m.replace("_", "-") for m in OPTIONAL}
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = {line.split("==")[0].lower().replace("_", "-") for line in lines
            if "==" in line and not line.startswith("#")}
    assert core <= pins, core - pins
