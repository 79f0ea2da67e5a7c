"""A pipeline saved with TAESD as its VAE loads back in a fresh process: with TaesdVAE after a plain
`import taesd` (model_index.json names ["taesd", "TaesdVAE"]), and in its portable form (diffusers'
own AutoencoderTiny, base variants) with taesd not importable at all. Tiny offline SD 1.5 pipeline."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from conftest import ROOT  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
LATENTS = "torch.manual_seed(0); z = torch.randn(1, 4, 4, 4)"


def fresh(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder of a saved pipeline with TaesdVAE, folder of its portable save, the decode of fixed latents)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import pipeline_configs as pc
    import taesd
    from taesd.integrations.diffusers import TaesdVAE
    tmp = tmp_path_factory.mktemp("saved")
    pipe = pc.sd15(tmp / "parts")
    pipe.vae = TaesdVAE.from_taesd(taesd.create("taesd", seed=0))
    pipe.save_pretrained(tmp / "with_taesd")
    torch.manual_seed(0)
    z = torch.randn(1, 4, 4, 4)
    expected = pipe.vae.decode(z).sample
    pipe.vae = pipe.vae.to_autoencoder_tiny()
    pipe.save_pretrained(tmp / "portable")
    torch.save(expected, tmp / "expected.pt")
    return tmp


def test_saved_pipeline_names_taesd_and_reloads_after_import_taesd(saved):
    assert json.loads((saved / "with_taesd" / "model_index.json").read_text())["vae"] == ["taesd", "TaesdVAE"]
    code = f"""
import torch, taesd
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(saved / "with_taesd")!r})
assert type(pipe.vae).__name__ == "TaesdVAE", type(pipe.vae)
{LATENTS}
assert torch.allclose(pipe.vae.decode(z).sample, torch.load("expected.pt"), atol=1e-5)
print("ok")
"""
    r = fresh(code, saved)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_portable_save_loads_without_taesd(saved):
    assert json.loads((saved / "portable" / "model_index.json").read_text())["vae"] == \
        ["diffusers", "AutoencoderTiny"]
    code = f"""
import sys; sys.modules["taesd"] = None   # taesd is not installed
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(saved / "portable")!r})
assert type(pipe.vae).__name__ == "AutoencoderTiny", type(pipe.vae)
{LATENTS}
# AutoencoderTiny leaves its output unclamped; TaesdVAE clamps to [-1, 1]
assert torch.allclose(pipe.vae.decode(z).sample.clamp(-1, 1), torch.load("expected.pt"), atol=1e-5)
print("ok")
"""
    r = fresh(code, saved)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_a_variant_without_a_diffusers_class_has_no_portable_form():
    import taesd
    from taesd.integrations.diffusers import TaesdVAE
    vae = TaesdVAE.from_taesd(taesd.create("taef2", seed=0))
    with pytest.raises(taesd.TaesdError, match="no portable form"):
        vae.to_autoencoder_tiny()
