"""Video previews in the sampling loop, on real tiny diffusers pipelines (Wan; HunyuanVideo 1.5 through
``watching``; Krea 2's packed latents): the callback runs when asked, its images have the right size,
the run's result is the same with or without it, and a finished run's "first" preview is the
pipeline's own first frame."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from taesd.errors import TaesdError

diffusers = pytest.importorskip("diffusers")

from taesd.integrations.diffusers.preview_video import VideoPreviewCallback  # noqa: E402
from taesd.integrations.diffusers.video import TaehvVAE  # noqa: E402
from test_video_diffusers import fresh_file, generate, hunyuan_video15, krea2  # noqa: E402


def wan(vae):
    torch.manual_seed(0)
    tr = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                         in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                         num_layers=1, rope_max_seq_len=32)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    kw = dict(prompt_embeds=torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1)), height=32,
              width=32, num_frames=9, num_inference_steps=3, guidance_scale=1.0)
    return pipe, kw


@pytest.fixture(scope="module")
def taew2_1(tmp_path_factory):
    return fresh_file("taew2_1", tmp_path_factory.mktemp("taew2_1"))


@torch.no_grad()
def test_wan_first_frame_preview_leaves_the_run_alone_and_ends_on_its_first_frame(taew2_1):
    pipe, kw = wan(TaehvVAE.from_file(taew2_1, "taew2_1", fast=False))
    shown = []
    preview = VideoPreviewCallback(pipe, every=2, frames="first", time_upscale=True, fast=False,
                                   max_size=None, on_preview=shown.append)
    with_preview = generate(pipe, "pt", callback_on_step_end=preview, **kw)
    without = generate(pipe, "pt", **kw)
    assert torch.equal(with_preview, without)
    assert [p.step for p in shown] == [1, 2]               # every 2nd step, and the last
    assert all(len(p.images) == 1 and p.images[0].size == (32, 32) for p in shown)
    # the last step's latents are the final ones: the preview is the video's first frame
    assert (shown[-1].frames[0] - with_preview[0, 0]).abs().max() <= 1e-5
    assert preview.cost()["previews"] == 2 and "2 video previews" in preview.report()


@torch.no_grad()
def test_wan_strided_and_whole_clip_previews_are_written(taew2_1, tmp_path):
    pipe, kw = wan(TaehvVAE.from_file(taew2_1, "taew2_1", fast=False))
    strided = VideoPreviewCallback(pipe, every=3, frames=2, max_size=16, out_dir=tmp_path / "strided")
    generate(pipe, "latent", callback_on_step_end=strided, **kw)
    (last,) = strided.previews
    assert last.latent_frames == [0, 2] and [im.size for im in last.images] == [(16, 16)] * 2
    assert Image.open(tmp_path / "strided" / "step_002.png").size == (32, 16)   # the two side by side
    one_by_one = VideoPreviewCallback(pipe, every=3, frames=2, chunk=1, on_preview=lambda _: None)
    generate(pipe, "latent", callback_on_step_end=one_by_one, **kw)   # memory bound: one latent at a time
    torch.testing.assert_close(one_by_one.previews[0].frames, last.frames, atol=1e-5, rtol=0)
    whole = VideoPreviewCallback(pipe, every=3, frames="all", max_frames=2, out_dir=tmp_path / "all")
    generate(pipe, "latent", callback_on_step_end=whole, **kw)
    assert whole.previews[0].latent_frames == [0, 2]     # 3 latent frames, capped at 2, evenly spaced
    assert whole.previews[0].frames.shape == (2, 3, 32, 32)   # temporal upsampling off: one image each
    with Image.open(tmp_path / "all" / "step_002.webp") as anim:
        assert anim.n_frames == 2


@torch.no_grad()
def test_a_failing_preview_never_breaks_the_run(taew2_1):
    pipe, kw = wan(TaehvVAE.from_file(taew2_1, "taew2_1", fast=False))

    def broken(_):
        raise RuntimeError("display gone")
    preview = VideoPreviewCallback(pipe, on_preview=broken)
    assert torch.equal(generate(pipe, "pt", callback_on_step_end=preview, **kw), generate(pipe, "pt", **kw))
    assert preview.disabled and "display gone" in str(preview.error)
    with pytest.raises(RuntimeError, match="display gone"):
        generate(pipe, "pt", callback_on_step_end=VideoPreviewCallback(pipe, on_preview=broken,
                                                                          raise_errors=True), **kw)


@torch.no_grad()
def test_hunyuan_video15_previews_through_its_scheduler(tmp_path):
    pipe, kw = hunyuan_video15(TaehvVAE.from_file(fresh_file("taehv1_5", tmp_path), "taehv1_5", fast=False))
    shown = []
    preview = VideoPreviewCallback(pipe, frames="all", on_preview=shown.append)
    with preview.watching(pipe):
        generate(pipe, "latent", **kw)
        watched = generate(pipe, "pt", **kw)                # a second run in the block starts again
    assert "step" not in vars(pipe.scheduler)               # the scheduler is itself again
    assert torch.equal(watched, generate(pipe, "pt", **kw)) and [p.step for p in shown] == [0, 1, 0, 1]
    assert len(preview.previews) == 2                       # the second run's
    assert shown[-1].frames.shape == (3, 3, 32, 32)
    wan_pipe, _ = wan(TaehvVAE("taew2_1"))
    with pytest.raises(TaesdError, match="callback_on_step_end"), preview.watching(wan_pipe):
        pass


@torch.no_grad()
def test_krea2_packed_latents_need_the_call_size(taew2_1):
    pipe, kw = krea2(TaehvVAE.from_file(taew2_1, "taew2_1", fast=False))
    with pytest.raises(TaesdError, match="height and width"):
        VideoPreviewCallback(pipe, on_preview=print)
    shown = []
    preview = VideoPreviewCallback(pipe, height=32, width=48, time_upscale=True, fast=False, max_size=None,
                                   on_preview=shown.append)
    image = generate(pipe, "pt", callback_on_step_end=preview, **kw)
    assert shown[-1].images[0].size == (48, 32)
    assert (shown[-1].frames[0] - image[0]).abs().max() <= 1e-5
    with pytest.raises(TaesdError, match="does not speak"):
        VideoPreviewCallback(pipe, TaehvVAE("taehv"), height=32, width=48, on_preview=print)
