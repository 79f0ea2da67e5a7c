"""Real diffusers pipelines (tiny, fresh weights, no downloads) with live previews and TAESD as
their VAE. The pipelines' own decode paths and unpack functions are the oracles."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import Flux2Pipeline, FluxPipeline  # noqa: E402

import pipeline_configs as pc  # noqa: E402
from pipeline_configs import one_thread  # noqa: E402,F401  (autouse fixture)
from taesd import TaesdError  # noqa: E402
from taesd.integrations.diffusers.contracts import contract_for, pipeline_to_raw, pipeline_to_taesd  # noqa: E402
from taesd.integrations.diffusers.preview import PreviewCallback  # noqa: E402
from taesd.integrations.diffusers.vae import use_taesd_vae  # noqa: E402
from taesd.registry import VARIANTS  # noqa: E402

FAMILIES = list(pc.BUILDERS)  # taesd (SD 1.x), taesdxl, taesd3, taef1, taef2, taef2-klein, taesana, taeqi2_1


def shape_of(family: str, batch: int = 1) -> tuple:
    size = pc.size_of(family)
    return (batch, VARIANTS[pc.variant_of(family)].image_channels, size, size)


def run(pipe, variant, callback=None, **overrides):
    """Generate; returns (images, the pipeline latents after every step)."""
    seen = []

    def record(p, step, timestep, kwargs):
        seen.append(kwargs["latents"].detach().clone())
        return callback(p, step, timestep, kwargs) if callback is not None else {}

    out = pipe(**{**pc.inputs(variant), **overrides}, callback_on_step_end=record)
    return out.images, seen


@pytest.mark.parametrize("variant", FAMILIES)
def test_previews_of_a_real_pipeline_follow_its_own_decode_path(variant, tmp_path, weights):
    family, size = variant, pc.size_of(variant)
    pipe = pc.shared(family)
    model = pc.preview_model(family, weights)
    given_to_vae = []  # what the pipeline itself hands its big VAE's decoder
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: (given_to_vae.append(z.detach().clone()), decode(z, *a, **k))[1]
    frames = []
    try:
        with PreviewCallback(pipe, model, out_dir=tmp_path, on_preview=frames.append) as preview:
            images, seen = run(pipe, family, preview)
    finally:
        del pipe.vae.decode
    assert images.shape == shape_of(family)

    assert [f.step for f in frames] == [0, 1]
    for f in frames:
        assert f.image.size == (size, size)
        assert f.images.shape == shape_of(family)
        assert torch.isfinite(f.images).all()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["contact_sheet.png", "frame_000_step_000.png", "frame_001_step_001.png", "preview.webp"]
    with Image.open(tmp_path / "preview.webp") as anim:
        assert anim.n_frames == 2 and anim.size == (size, size)

    # The contract reproduces the pipeline's own latents -> VAE path (scale, shift, FLUX.2 BatchNorm,
    # Qwen 2.1's mean/std and frame axis).
    contract = contract_for(pipe)
    assert torch.allclose(pipeline_to_raw(seen[-1], contract, size, size), given_to_vae[0], atol=1e-5)
    # The previews are TAESD's decode of what the pipeline carries, converted by the contract.
    z = pipeline_to_taesd(seen[-1], contract, size, size)
    assert torch.allclose(frames[-1].images, model.decode(z), atol=1e-5)
    assert preview.cost()["previews"] == 2 and preview.cost()["median_s"] > 0


def test_flux1_preview_unpacking_equals_the_pipelines_unpack(tmp_path):
    pipe = pc.shared("taef1")
    with PreviewCallback(pipe, pc.preview_model("taef1"), on_preview=lambda f: None) as preview:
        _, seen = run(pipe, "taef1", preview)
    theirs = FluxPipeline._unpack_latents(seen[-1], pc.SIZE, pc.SIZE, pipe.vae_scale_factor)
    assert preview._ids is not None  # the transformer's img_ids were seen
    assert torch.equal(pipeline_to_taesd(seen[-1], contract_for(pipe), ids=preview._ids), theirs)


def test_flux2_preview_unpacking_equals_the_pipelines_unpack(weights):
    pipe = pc.shared("taef2")
    with PreviewCallback(pipe, pc.preview_model("taef2", weights), on_preview=lambda f: None) as preview:
        _, seen = run(pipe, "taef2", preview)
    side = pc.SIZE // 16
    ids = Flux2Pipeline._prepare_latent_ids(torch.empty(1, 128, side, side))
    theirs = Flux2Pipeline._unpatchify_latents(Flux2Pipeline._unpack_latents_with_ids(seen[-1], ids))
    assert preview._ids is not None and preview._ids.shape[-1] == 4
    assert torch.equal(pipeline_to_taesd(seen[-1], contract_for(pipe), ids=preview._ids), theirs)


@pytest.mark.parametrize("variant", ["taesd", "taef2"])  # Euler; FlowMatch (packed, x_t - sigma v)
def test_x0_previews_show_the_schedulers_prediction(variant, weights):
    pipe = pc.shared(variant)
    model = pc.preview_model(variant, weights)
    frames = []
    with PreviewCallback(pipe, model, show="x0", on_preview=frames.append) as preview:
        _, seen = run(pipe, variant, preview, num_inference_steps=3)
    assert [f.kind for f in frames] == ["x0", "x0", "x0"]
    contract = contract_for(pipe)
    sample_0 = pipeline_to_taesd(seen[0], contract, pc.SIZE, pc.SIZE)
    final = pipeline_to_taesd(seen[-1], contract, pc.SIZE, pc.SIZE)
    # The last step lands on the prediction (final sigma 0); earlier, x0 is not the noisy sample.
    assert torch.allclose(frames[-1].latents, final, atol=1e-4)
    assert not torch.allclose(frames[0].latents, sample_0, atol=1e-2)
    assert torch.allclose(frames[-1].images, model.decode(final), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pipeline_with_taesd_as_its_vae_makes_the_image(family, weights):
    variant, size = pc.variant_of(family), pc.size_of(family)
    pipe = pc.shared(family)
    big_vae = pipe.vae
    try:
        use_taesd_vae(pipe, pc.preview_model(family, weights))
        assert type(pipe.vae).__name__ == "TaesdVAE" and pipe.vae.config.taesd_variant == variant
        given = []  # what the pipeline's own unpack/normalise code hands the VAE
        decode = pipe.vae.decode
        pipe.vae.decode = lambda z, *a, **k: (given.append(z.detach().clone()), decode(z, *a, **k))[1]
        try:
            images, seen = run(pipe, family)
        finally:
            del pipe.vae.decode
        vae = pipe.vae
    finally:
        pipe.vae = big_vae
    assert images.shape == shape_of(family)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    # The oracle is the pipeline's own conversion: with TaesdVAE's config it must land exactly on
    # the family contract's TAESD latents (scale/shift, FLUX.2's BatchNorm, Qwen's mean/std: identity).
    expected_z = pipeline_to_taesd(seen[-1], contract_for(variant), size, size)
    handed = given[0][:, :, 0] if variant == "taeqi2_1" else given[0]
    assert given[0].ndim == (5 if variant == "taeqi2_1" else 4)
    assert torch.allclose(handed, expected_z, atol=1e-6, rtol=1e-6)
    # The pipeline's image is TAESD's decode of its final latents.
    expected = vae.taesd.decode(expected_z)
    assert torch.allclose(images, expected, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pipeline_holding_taesd_vae_saves_and_loads_back(family, weights, tmp_path):
    import json

    from diffusers import DiffusionPipeline
    pipe = pc.shared(family)
    big_vae = pipe.vae
    try:
        use_taesd_vae(pipe, pc.preview_model(family, weights))
        images, _ = run(pipe, family, generator=torch.Generator().manual_seed(0))
        pipe.save_pretrained(tmp_path / "pipe")
    finally:
        pipe.vae = big_vae
    index_path = tmp_path / "pipe" / "model_index.json"
    # diffusers records a non-diffusers class by its module path, which imports without diffusers' help.
    assert json.loads(index_path.read_text())["vae"] == ["taesd", "TaesdVAE"]   # importable after `import taesd`
    extra = {k: None for k, v in pipe.components.items() if v is None}  # diffusers wants absent parts named
    if family == "taeqi2_1":  # a test-only processor subclass (no torchvision here): pass it back in,
        extra["processor"] = pipe.processor   # recorded as the real pipeline records its processor
        index = json.loads(index_path.read_text())
        index["processor"] = ["transformers", "Qwen3VLProcessor"]
        index_path.write_text(json.dumps(index))
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe", **extra)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == type(pipe).__name__ and type(loaded.vae).__name__ == "TaesdVAE"
    again, _ = run(loaded, family, generator=torch.Generator().manual_seed(0))
    # the reloaded VAE may pick another (Winograd vs direct) kernel for a layer: equal within 1e-5
    torch.testing.assert_close(again, images, atol=1e-5, rtol=0)
    if family == "taef2":  # a hand-written ["taesd", "TaesdVAE"] entry resolves too (lazy taesd.TaesdVAE)
        index = json.loads(index_path.read_text())
        index["vae"] = ["taesd", "TaesdVAE"]
        index_path.write_text(json.dumps(index))
        loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe", **extra)
        loaded.set_progress_bar_config(disable=True)
        assert torch.equal(run(loaded, family, generator=torch.Generator().manual_seed(0))[0], images)


@pytest.mark.parametrize("family", FAMILIES)
def test_previews_of_a_pipeline_with_taesd_vae(family, weights):
    pipe = pc.shared(family)
    big_vae = pipe.vae
    frames = []
    try:
        use_taesd_vae(pipe, pc.preview_model(family, weights))
        # No decoder given: the callback previews with the pipeline's own TaesdVAE (nothing loaded).
        with PreviewCallback(pipe, on_preview=frames.append) as preview:
            images, _ = run(pipe, family, preview)
        assert preview.taesd is pipe.vae.taesd
    finally:
        pipe.vae = big_vae
    assert [f.step for f in frames] == [0, 1] and preview.error is None
    assert all(torch.isfinite(f.images).all() and f.images.shape == shape_of(family) for f in frames)
    assert not torch.equal(frames[0].images, frames[1].images)
    # The last preview is the final image: the same latents, the same decoder.
    assert torch.allclose(frames[-1].images, images, atol=1e-5)


def test_taesd_vae_gives_a_pil_image_end_to_end():
    pipe = pc.shared("taesd")
    big_vae = pipe.vae
    try:
        use_taesd_vae(pipe, pc.preview_model("taesd"))
        image = pipe(**{**pc.inputs("taesd"), "output_type": "pil"}).images[0]
    finally:
        pipe.vae = big_vae
    assert isinstance(image, Image.Image) and image.size == (pc.SIZE, pc.SIZE)


def test_a_taesd_of_the_wrong_family_is_refused():
    pipe = pc.shared("taef1")
    with pytest.raises(TaesdError, match="16-channel"):
        use_taesd_vae(pipe, pc.preview_model("taesd"))
    with pytest.raises(TaesdError, match="not taesd3"):    # same channels, another latent space
        use_taesd_vae(pipe, pc.preview_model("taesd3"))
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    for family, wrong in [("taesana", "taef2"), ("taeqi2_1", "taesana"), ("taef2-klein", "taef1")]:
        with pytest.raises(TaesdError, match=f"not {wrong} ones") as err:
            use_taesd_vae(pc.shared(family), pc.preview_model(wrong))
        assert "\n" not in str(err.value)


def test_the_example_script_generates_with_previews(tmp_path, capsys):
    import importlib.util

    from taesd.io.weights.formats import save_weights, state_dicts
    pc.shared("taesd").save_pretrained(tmp_path / "pipe")
    save_weights(state_dicts(pc.preview_model("taesd")), "taesd", "pth", tmp_path / "weights")
    path = pc.ROOT / "examples" / "generate_with_previews.py"
    spec = importlib.util.spec_from_file_location("generate_with_previews", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "out"
    assert example.main([str(tmp_path / "pipe"), "a cat", "-o", str(out), "--steps", "2", "--size", str(pc.SIZE),
                         "--weights", str(tmp_path / "weights"), "--device", "cpu"]) == 0
    assert {"frame_000_step_000.png", "frame_001_step_001.png", "preview.webp", "contact_sheet.png",
            "image.png"} <= {p.name for p in out.iterdir()}
    with Image.open(out / "image.png") as image:
        assert image.size == (pc.SIZE, pc.SIZE)
    assert "2 previews" in capsys.readouterr().out


def test_a_pipeline_without_its_vae_uses_the_registry_constants():
    pipe = pc.shared("taef1")
    big_vae = pipe.vae
    try:
        pipe.vae = None
        assert contract_for(pipe) == contract_for("taef1")
    finally:
        pipe.vae = big_vae
    assert contract_for(pipe).source == "AutoencoderKL"
