"""The preview callback's options, outputs and failure handling, on a real tiny SD pipeline."""
from __future__ import annotations

import logging
import os

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pipeline_configs as pc  # noqa: E402
from pipeline_configs import one_thread  # noqa: E402,F401  (autouse fixture)
from taesd import TaesdError  # noqa: E402
from taesd.integrations.diffusers.preview import PreviewCallback, contact_sheet  # noqa: E402


def generate(callback, **overrides):
    pipe = pc.shared("taesd")
    return pipe(**{**pc.inputs("taesd"), **overrides}, callback_on_step_end=callback).images


def test_every_n_steps_plus_the_last_batch_grid_max_size_and_gif(tmp_path):
    frames = []
    with PreviewCallback(pc.shared("taesd"), pc.preview_model("taesd"), every=2, batch="all", max_size=32,
                         animation="gif", out_dir=tmp_path, on_preview=frames.append) as preview:
        images = generate(preview, num_inference_steps=3, prompt=["a cat", "a dog"])
    assert images.shape[0] == 2
    assert [f.step for f in frames] == [1, 2]             # every 2nd step, and the last one
    assert all(f.images.shape == (2, 3, pc.SIZE, pc.SIZE) for f in frames)
    assert all(f.image.size == (32, 16) for f in frames)  # the batch side by side, fitted to 32
    with Image.open(tmp_path / "preview.gif") as gif:
        assert gif.size == (32, 16)
    with Image.open(tmp_path / "contact_sheet.png") as sheet:
        assert sheet.size == (64, 16)                     # two frames in one row
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "contact_sheet.png", "frame_000_step_001.png", "frame_001_step_002.png", "preview.gif"]
    cost = preview.cost()
    assert cost["previews"] == 2 and 0 < cost["decode_median_s"] <= cost["median_s"]
    assert "2 previews" in preview.report()


def test_the_first_image_only_and_a_second_run_starts_afresh():
    frames = []
    with PreviewCallback(pc.shared("taesd"), pc.preview_model("taesd"), max_size=None,
                         on_preview=frames.append) as preview:
        generate(preview, prompt=["a cat", "a dog"])
        generate(preview)
        assert len(preview.frames) == 2                   # only the second run's frames are kept
    assert len(frames) == 4
    assert all(f.images.shape[0] == 1 and f.image.size == (pc.SIZE, pc.SIZE) for f in frames)


def test_a_failing_preview_never_breaks_the_generation(caplog):
    calls = []

    def broken(frame):
        calls.append(frame.step)
        raise RuntimeError("the display went away")

    with caplog.at_level(logging.WARNING, logger="taesd.integrations.diffusers.preview"):
        with PreviewCallback(pc.shared("taesd"), pc.preview_model("taesd"), on_preview=broken) as preview:
            images = generate(preview, num_inference_steps=3)
    assert images.shape == (1, 3, pc.SIZE, pc.SIZE) and torch.isfinite(images).all()
    assert calls == [0]                                   # disabled after the first failure
    assert preview.disabled and "display went away" in str(preview.error)
    assert len([r for r in caplog.records if "preview failed" in r.message]) == 1
    assert "failed" in preview.report()


def test_raise_errors_stops_the_generation():
    def broken(frame):
        raise RuntimeError("the display went away")

    with PreviewCallback(pc.shared("taesd"), pc.preview_model("taesd"), on_preview=broken,
                         raise_errors=True) as preview:
        with pytest.raises(RuntimeError, match="display went away"):
            generate(preview)


def test_a_wrong_taesd_is_a_logged_failure_not_a_crash():
    # A 16-channel decoder on SD's 4-channel latents: TaesdError inside the preview, caught.
    with PreviewCallback(pc.shared("taesd"), pc.preview_model("taef1"), on_preview=lambda f: None) as preview:
        images = generate(preview)
    assert images.shape == (1, 3, pc.SIZE, pc.SIZE)
    assert isinstance(preview.error, TaesdError) and "4 channels" in str(preview.error)


def test_attach_and_detach_leave_the_pipeline_as_it_was():
    pipe = pc.shared("taef1")
    step_before = pipe.scheduler.step
    hooks_before = len(pipe.transformer._forward_pre_hooks)
    preview = PreviewCallback(pipe, pc.preview_model("taef1"), on_preview=lambda f: None)
    assert "step" in vars(pipe.scheduler) and len(pipe.transformer._forward_pre_hooks) == hooks_before + 1
    preview.detach()
    assert "step" not in vars(pipe.scheduler) and pipe.scheduler.step == step_before
    assert len(pipe.transformer._forward_pre_hooks) == hooks_before


@pytest.mark.parametrize("kwargs, message", [
    ({"every": 0}, "every"), ({"batch": "some"}, "batch"), ({"show": "noise"}, "show"),
    ({"animation": "mp4"}, "animation"), ({"on_preview": None}, "previews go nowhere")])
def test_bad_options_are_one_line_errors(kwargs, message):
    options = {"on_preview": lambda f: None, **kwargs}
    with pytest.raises(TaesdError, match=message):
        PreviewCallback(None, pc.preview_model("taesd"), **options)


def test_contact_sheet_lays_frames_out_row_by_row():
    frames = [Image.new("RGB", (40, 30), (40 * k, 0, 0)) for k in range(5)]
    sheet = contact_sheet(frames, [f"step {k}" for k in range(5)])
    assert sheet.size == (120, 60)                        # 3 columns, 2 rows
    assert sheet.getpixel((119, 29)) == (80, 0, 0)        # third frame, below its label
    assert sheet.getpixel((41, 1)) == (0, 0, 0)           # second frame's label background
    assert frames[1].getpixel((1, 1)) == (40, 0, 0)       # the frames themselves are untouched


def test_a_callback_built_without_the_pipeline_attaches_at_the_first_step():
    pipe = pc.shared("taef1")
    frames = []
    with PreviewCallback(taesd=pc.preview_model("taef1"), on_preview=frames.append,
                         height=pc.SIZE, width=pc.SIZE) as preview:
        assert preview.contract is None
        pipe(**pc.inputs("taef1"), callback_on_step_end=preview)
        assert preview.contract.variant == "taef1" and preview.contract.source == "AutoencoderKL"
    assert [f.step for f in frames] == [0, 1] and preview.error is None
    assert frames[0].latents.shape == (1, 16, pc.SIZE // 8, pc.SIZE // 8)
    assert "step" not in vars(pipe.scheduler)             # the exit detached it
