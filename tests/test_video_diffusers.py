"""TAEHV as ``pipe.vae`` in real diffusers video pipelines (tiny local configs, fresh weights, no
downloads): Krea 2, HunyuanVideo, HunyuanVideo 1.5, LTX-2 and CogVideoX generate with the drop-in, the
tensor each hands its VAE is its own conversion of its latents, and the result equals decoding the
pipeline's ``output_type="latent"`` latents by hand through ``taesd.video`` (fp32, <= 1e-5).
(Wan and Qwen Image: tests/test_taehv.py.)"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from taesd.errors import TaesdError
from taesd.video import TAEHV, load

diffusers = pytest.importorskip("diffusers")

from taesd.integrations.diffusers.video import TaehvVAE, use_taehv_vae  # noqa: E402
from taesd.integrations.diffusers.video_contracts import contract_for, to_taehv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _refs_script():
    spec = importlib.util.spec_from_file_location("make_taehv_refs", ROOT / "scripts" / "make_taehv_refs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF = _refs_script()


def fresh_file(name: str, folder: Path) -> Path:
    """Seeded weights (pixels inside (0, 1)) written as the published ``.pth``."""
    shapes = {k: tuple(v.shape) for k, v in TAEHV(name).state_dict().items()}
    path = folder / f"{name}.pth"
    torch.save(REF.fresh_state_dict(name, shapes), path)
    return path


def spy_decode(vae) -> list[torch.Tensor]:
    """Records every tensor the pipeline hands to ``vae.decode``."""
    seen, original = [], vae.decode

    def decode(z, *args, **kwargs):
        seen.append(z.clone())
        return original(z, *args, **kwargs)
    vae.decode = decode
    return seen


def generate(pipe, output_type: str, **kw):
    out = pipe(**kw, output_type=output_type, generator=torch.Generator().manual_seed(0))
    return out.images if hasattr(out, "images") else out.frames


def flow():
    return diffusers.FlowMatchEulerDiscreteScheduler()


# --- the tiny pipelines ----------------------------------------------------------------------------------
def krea2(vae):
    torch.manual_seed(0)
    tr = diffusers.Krea2Transformer2DModel(
        in_channels=64, num_layers=1, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=2,
        text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6))
    pipe = diffusers.Krea2Pipeline(scheduler=flow(), vae=vae, text_encoder=None, tokenizer=None, transformer=tr)
    kw = dict(prompt_embeds=torch.randn(1, 8, 2, 16), prompt_embeds_mask=torch.ones(1, 8, dtype=torch.bool),
              height=32, width=48, num_inference_steps=2, guidance_scale=0.0, max_sequence_length=8)
    return pipe, kw


def hunyuan_video(vae):
    torch.manual_seed(0)
    tr = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))
    pipe = diffusers.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tr, vae=vae,
                                          scheduler=flow(), text_encoder_2=None, tokenizer_2=None)
    kw = dict(prompt_embeds=torch.randn(1, 8, 16), pooled_prompt_embeds=torch.randn(1, 8),
              prompt_attention_mask=torch.ones(1, 8, dtype=torch.long), height=32, width=32, num_frames=9,
              num_inference_steps=2)
    return pipe, kw


def hunyuan_video15(vae):
    from diffusers.guiders import ClassifierFreeGuidance
    torch.manual_seed(0)
    tr = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=65, out_channels=32, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(2, 2, 4),
        task_type="t2v")
    pipe = diffusers.HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=tr, vae=vae,
                                            scheduler=flow(), text_encoder_2=None, tokenizer_2=None,
                                            guider=ClassifierFreeGuidance(guidance_scale=1.0))
    kw = dict(prompt_embeds=torch.randn(1, 8, 16), prompt_embeds_mask=torch.ones(1, 8, dtype=torch.long),
              prompt_embeds_2=torch.randn(1, 4, 8), prompt_embeds_mask_2=torch.ones(1, 4, dtype=torch.long),
              height=32, width=32, num_frames=9, num_inference_steps=2)
    return pipe, kw


def ltx2(vae):
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    torch.manual_seed(0)
    tr = diffusers.LTX2VideoTransformer3DModel(
        in_channels=128, out_channels=128, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=1, caption_channels=16, rope_double_precision=False,
        rope_type="split")
    connectors = LTX2TextConnectors(
        caption_channels=16, text_proj_in_factor=2, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=4, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32,
        rope_double_precision=False, causal_temporal_positioning=False, rope_type="split")
    audio_vae = diffusers.AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8)
    vocoder = LTX2Vocoder(in_channels=16, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4],
                          upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
                          leaky_relu_negative_slope=0.1, output_sampling_rate=16000)
    pipe = diffusers.LTX2Pipeline(scheduler=flow(), vae=vae, audio_vae=audio_vae, text_encoder=None, tokenizer=None,
                                  connectors=connectors, transformer=tr, vocoder=vocoder)
    kw = dict(prompt_embeds=torch.randn(1, 8, 32), prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
              height=64, width=64, num_frames=9, num_inference_steps=2, guidance_scale=1.0, stg_scale=0.0,
              modality_scale=1.0, guidance_rescale=0.0, audio_guidance_scale=1.0, audio_stg_scale=0.0,
              audio_modality_scale=1.0, audio_guidance_rescale=0.0, spatio_temporal_guidance_blocks=None,
              use_cross_timestep=False, frame_rate=25.0, max_sequence_length=8)
    return pipe, kw


def cogvideox(vae, patch_size_t: int | None = None):
    """CogVideoX (``patch_size_t=None``) or a 1.5-style transformer (2: latent frames padded in front)."""
    torch.manual_seed(0)
    tr = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, time_embed_dim=8,
        text_embed_dim=16, num_layers=1, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
        patch_size_t=patch_size_t, max_text_seq_length=8, use_rotary_positional_embeddings=bool(patch_size_t))
    pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                                       scheduler=diffusers.CogVideoXDDIMScheduler())
    kw = dict(prompt_embeds=torch.randn(1, 8, 16), height=32, width=32, num_frames=9, num_inference_steps=2,
              guidance_scale=1.0)
    return pipe, kw


# --- the tests ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_krea2_generates_with_taew2_1_at_one_frame(tmp_path):
    path = fresh_file("taew2_1", tmp_path)
    pipe, kw = krea2(TaehvVAE.from_file(path, "taew2_1", fast=False))
    assert pipe.vae_scale_factor == 8
    packed = generate(pipe, "latent", **kw)                      # N x (h/2 * w/2) x 4C
    seen = spy_decode(pipe.vae)
    image = generate(pipe, "pt", **kw)
    assert image.shape == (1, 3, 32, 48)
    unpacked = pipe._unpack_latents(packed, 32, 48)                 # the pipeline's own: N x C x 1 x h x w
    assert torch.equal(seen[0], unpacked)                           # mean 0 / std 1: its conversion is the identity
    z = to_taehv(packed, contract_for(pipe), grid=(1, 4, 6))        # our unpacking, NTCHW
    assert torch.equal(z, unpacked.transpose(1, 2))
    by_hand = load(path, "taew2_1", fast=False).decode(z)[:, 0]
    assert (image - by_hand).abs().max() <= TOL


@pytest.mark.parametrize("build,name", [(hunyuan_video, "taehv"), (hunyuan_video15, "taehv1_5")],
                         ids=["HunyuanVideo", "HunyuanVideo15"])
@torch.no_grad()
def test_hunyuan_video_pipelines_generate_with_taehv(tmp_path, build, name):
    path = fresh_file(name, tmp_path)
    pipe, kw = build(TaehvVAE.from_file(path, name, fast=False))
    latents = generate(pipe, "latent", **kw)                        # N x C x T' x h x w, the model's latents
    seen = spy_decode(pipe.vae)
    video = generate(pipe, "pt", **kw)
    assert video.shape == (1, 9, 3, 32, 32)
    assert pipe.vae.config.scaling_factor == 1.0 and torch.equal(seen[0], latents)   # latents / 1
    by_hand = load(path, name, fast=False).decode(to_taehv(latents, contract_for(pipe)))
    assert (video - by_hand).abs().max() <= TOL
    # encode: the latent grid the pipeline denoises
    assert pipe.vae.encode(video.transpose(1, 2) * 2 - 1).latents.shape == latents.shape
    pipe.vae.enable_tiling()          # the pipelines' examples ask for it: bounded memory, same video
    pipe.vae.chunk = 4                # 4 frames per step: one latent at a time
    torch.testing.assert_close(generate(pipe, "pt", **kw), video, atol=TOL, rtol=0)


@torch.no_grad()
def test_ltx2_generates_with_taeltx_2(tmp_path):
    path = fresh_file("taeltx_2", tmp_path)
    pipe, kw = ltx2(TaehvVAE.from_file(path, "taeltx_2", fast=False))
    assert (pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio) == (32, 8)
    out = generate(pipe, "latent", **kw)                            # unpacked and denormalised by the pipeline
    seen = spy_decode(pipe.vae)
    video = generate(pipe, "pt", **kw)
    assert video.shape == (1, 9, 3, 64, 64)
    vae = pipe.vae   # the pipeline's own inverse of its denormalisation gives back the model's latents
    model_latents = pipe._normalize_latents(out, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    assert torch.equal(model_latents, out) and torch.equal(seen[0], out)
    by_hand = load(path, "taeltx_2", fast=False).decode(to_taehv(model_latents, contract_for(pipe)))
    assert (video - by_hand).abs().max() <= TOL


@pytest.mark.parametrize("patch_size_t", [None, 2], ids=["CogVideoX", "CogVideoX1.5"])
@torch.no_grad()
def test_cogvideox_generates_with_taecvx_on_the_raw_latents(tmp_path, patch_size_t):
    path = fresh_file("taecvx", tmp_path)
    pipe, kw = cogvideox(TaehvVAE.from_file(path, "taecvx", fast=False, scaling_factor=0.7), patch_size_t)
    assert pipe.vae_scaling_factor_image == 0.7 and pipe.vae_scale_factor_spatial == 8
    latents = generate(pipe, "latent", **kw)                        # N x T' x C x h x w (1.5: padded in front)
    seen = spy_decode(pipe.vae)
    video = generate(pipe, "pt", **kw)
    assert video.shape == (1, 9, 3, 32, 32)
    pad = latents.shape[1] - 3                                      # 9 frames -> 3 latents
    assert pad == (1 if patch_size_t else 0)
    raw = to_taehv(latents[:, pad:], contract_for(pipe), scaling_factor=0.7)   # TAECVX speaks the raw latent
    assert torch.equal(seen[0].transpose(1, 2), raw)                # the pipeline's 1 / 0.7 * latents
    by_hand = load(path, "taecvx", fast=False).decode(raw)
    assert (video - by_hand).abs().max() <= TOL


@torch.no_grad()
def test_use_taehv_vae_checks_the_variant_and_carries_cogvideox_scaling(tmp_path):
    cvx = fresh_file("taecvx", tmp_path)
    pipe, _ = cogvideox(TaehvVAE("taecvx", scaling_factor=0.7))
    use_taehv_vae(pipe, cvx)     # shapes shared with taehv / taew2_1 / taeos1_3: the pipeline says taecvx
    assert pipe.vae.config.taehv_variant == "taecvx" and pipe.vae.config.scaling_factor == 0.7
    hv, _ = hunyuan_video(TaehvVAE("taehv"))
    with pytest.raises(TaesdError, match="taehv"):
        use_taehv_vae(hv, fresh_file("taew2_1", tmp_path), "taew2_1")   # Wan latents in HunyuanVideo
    with pytest.raises(TaesdError, match="taehv"):
        use_taehv_vae(hv, TaehvVAE("taew2_1"))
    with pytest.raises(TaesdError, match="scaling_factor is 1"):
        TaehvVAE("taehv", scaling_factor=0.476986)              # taehv speaks the model's own latents
    assert TaehvVAE("taeos1_3").config.scaling_factor == 1.0    # no pipeline yet: still a VAE


@torch.no_grad()
def test_flux3_modular_decode_takes_taef2(taef2):
    """FLUX.3 exists in diffusers 0.42.1 only as a modular pipeline (Flux3ModularPipeline) on the FLUX.2
    VAE: its own unpack + decode blocks, with taef2's TaesdVAE as the vae, give taef2's decode of the
    unpatchified latents (its BatchNorm inverse is the identity on the drop-in)."""
    from diffusers.modular_pipelines import SequentialPipelineBlocks
    from diffusers.modular_pipelines.flux3.decoders import Flux3DecodeStep, Flux3UnpackLatentsStep
    from diffusers.modular_pipelines.flux3.image_processor import Flux3ImageProcessor

    from taesd.integrations.diffusers.model import TaesdVAE
    blocks = SequentialPipelineBlocks.from_blocks_dict({"unpack": Flux3UnpackLatentsStep(),
                                                        "decode": Flux3DecodeStep()})
    pipe = blocks.init_pipeline()
    pipe.update_components(vae=TaesdVAE.from_taesd(taef2), image_processor=Flux3ImageProcessor())
    assert pipe.vae_scale_factor == 8
    tokens = torch.randn(1, 4 * 4, 128, generator=torch.Generator().manual_seed(0))   # 64 x 64 px
    image = pipe(latents=tokens, height=64, width=64, output_type="pt", output="images")
    z = tokens.view(1, 4, 4, 128).permute(0, 3, 1, 2)                                 # 128 x h/2 x w/2
    z = z.reshape(1, 32, 2, 2, 4, 4).permute(0, 1, 4, 2, 5, 3).reshape(1, 32, 8, 8)   # unpatchified
    assert image.shape == (1, 3, 64, 64) and (image - taef2.decode(z)).abs().max() <= TOL
