"""Tiny, real diffusers pipelines built offline from local configs with fresh weights.

Every pipeline keeps its family's real VAE class, latent channel count and scaling/shift config
(so the latent contract is exercised), and shrinks everything else. SD 1.x / SDXL / SD3 get real
tiny CLIP text encoders with a byte-level tokenizer written to a temporary folder (no download);
FLUX.1 / FLUX.2 / FLUX.2 Klein / Sana / Qwen Image 2.1 are called with ``prompt_embeds`` (their
T5 / Mistral / Qwen3 / Gemma2 / Qwen3-VL encoders are not the subject; Qwen 2.1's constructor needs
a real processor, built offline from a byte-level vocabulary).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32        # image pixels per side (FLUX packing needs a multiple of 16)
TEXT_DIM = 32    # hidden size of the tiny text encoders


def clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer whose vocabulary is the 256 byte symbols (no merges): offline."""
    from transformers import CLIPTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level BPE: each byte as a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def clip_config(projection: int | None = None):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=520, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=512,
                          eos_token_id=513, pad_token_id=513, projection_dim=projection or TEXT_DIM,
                          hidden_act="gelu")


def _vae_kl(latent_channels: int, scaling: float, shift: float | None = None, quant: bool = True):
    from diffusers import AutoencoderKL
    blocks = 4  # four blocks = 8x down, like the real VAE
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8,) * blocks, layers_per_block=1, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, sample_size=SIZE,
                         scaling_factor=scaling, shift_factor=shift,
                         use_quant_conv=quant, use_post_quant_conv=quant)


def sd15(tmp: Path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=SIZE // 8,
                                in_channels=4, out_channels=4, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=TEXT_DIM, attention_head_dim=4)
    return StableDiffusionPipeline(
        vae=_vae_kl(4, 0.18215), text_encoder=CLIPTextModel(clip_config()).eval(),
        tokenizer=clip_tokenizer(tmp / "tok"), unet=unet, scheduler=EulerDiscreteScheduler(steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sdxl(tmp: Path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(0)
    time_dim = 8
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=SIZE // 8,
                                in_channels=4, out_channels=4, norm_num_groups=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                attention_head_dim=(2, 4), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                                projection_class_embeddings_input_dim=6 * time_dim + TEXT_DIM,
                                cross_attention_dim=2 * TEXT_DIM)
    tok = clip_tokenizer(tmp / "tok")
    return StableDiffusionXLPipeline(
        vae=_vae_kl(4, 0.13025), text_encoder=CLIPTextModel(clip_config()).eval(),
        text_encoder_2=CLIPTextModelWithProjection(clip_config()).eval(), tokenizer=tok, tokenizer_2=tok,
        unet=unet, scheduler=EulerDiscreteScheduler(steps_offset=1), force_zeros_for_empty_prompt=True)


def sd3(tmp: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=SIZE // 8, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                        caption_projection_dim=16, joint_attention_dim=2 * TEXT_DIM,
                                        pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=16)
    tok = clip_tokenizer(tmp / "tok")
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae_kl(16, 1.5305, 0.0609, quant=False),
        text_encoder=CLIPTextModelWithProjection(clip_config()).eval(), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_config()).eval(), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None)


def flux1(tmp: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                                         axes_dims_rope=(4, 4, 8))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae_kl(16, 0.3611, 0.1159, quant=False),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)


def flux1_inputs(batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"prompt_embeds": torch.randn(batch, 8, TEXT_DIM, generator=g),
            "pooled_prompt_embeds": torch.randn(batch, TEXT_DIM, generator=g)}


def flux2(tmp: Path):
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=128, out_channels=128, num_layers=1,
                                          num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                          joint_attention_dim=TEXT_DIM, timestep_guidance_channels=16,
                                          axes_dims_rope=(4, 4, 4, 4))
    blocks = 4
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, latent_channels=32, block_out_channels=(8,) * blocks,
                             layers_per_block=1, norm_num_groups=4, sample_size=SIZE,
                             down_block_types=("DownEncoderBlock2D",) * blocks,
                             up_block_types=("UpDecoderBlock2D",) * blocks)
    # Non-trivial BatchNorm statistics, so the tests see whether it is applied (fresh ones are 0/1).
    g = torch.Generator().manual_seed(2)
    vae.bn.running_mean.copy_(torch.randn(128, generator=g) * 0.5)
    vae.bn.running_var.copy_(torch.rand(128, generator=g) * 3 + 0.25)
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=None,
                         tokenizer=None, transformer=transformer)


def flux2_inputs(batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"prompt_embeds": torch.randn(batch, 8, TEXT_DIM, generator=g)}


def flux2_klein(tmp: Path):
    from diffusers import Flux2KleinPipeline
    base = flux2(tmp)   # the same tiny transformer and FLUX.2 VAE; Klein has a Qwen3 text encoder
    return Flux2KleinPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=None, tokenizer=None,
                              transformer=base.transformer)


def sana(tmp: Path):
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(in_channels=32, out_channels=32, num_attention_heads=2,
                                         attention_head_dim=8, num_layers=1, num_cross_attention_heads=2,
                                         cross_attention_head_dim=8, cross_attention_dim=16,
                                         caption_channels=TEXT_DIM, sample_size=SANA_SIZE // 32)
    levels = 6  # six levels = 32x down, like DC-AE f32c32
    vae = AutoencoderDC(in_channels=3, latent_channels=32, attention_head_dim=4,
                        encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                        encoder_block_out_channels=(8,) * levels, decoder_block_out_channels=(8,) * levels,
                        encoder_layers_per_block=(1,) * levels, decoder_layers_per_block=(1,) * levels,
                        encoder_qkv_multiscales=((),) * levels, decoder_qkv_multiscales=((),) * levels,
                        encoder_out_shortcut=False, decoder_in_shortcut=False, scaling_factor=0.41407)
    return SanaPipeline(tokenizer=None, text_encoder=None, vae=vae.eval(), transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler())


def sana_inputs(batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"prompt_embeds": torch.randn(batch, 8, TEXT_DIM, generator=g),
            "prompt_attention_mask": torch.ones(batch, 8, dtype=torch.long)}


_QWEN_PROCESSOR: list = []


def offline_qwen_processor_class():
    """Qwen3VLProcessor without a video processor; a module attribute, so diffusers finds its class."""
    if not _QWEN_PROCESSOR:
        from transformers import Qwen3VLProcessor

        class OfflineQwen3VLProcessor(Qwen3VLProcessor):
            """No video processor: transformers' video processors need torchvision; 2.1 takes no video."""

            def check_argument_for_proper_class(self, name, arg):
                return None if name == "video_processor" and arg is None else \
                    super().check_argument_for_proper_class(name, arg)

            def save_pretrained(self, folder, **kwargs):   # the parts it has (loading gets it passed back)
                self.tokenizer.save_pretrained(folder)
                self.image_processor.save_pretrained(folder)
                return []

        globals()["OfflineQwen3VLProcessor"] = OfflineQwen3VLProcessor
        _QWEN_PROCESSOR.append(OfflineQwen3VLProcessor)
    return _QWEN_PROCESSOR[0]


def qwen_processor(folder: Path):
    """A real Qwen3-VL processor: byte-level BPE vocabulary (no merges) plus Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    symbols = _byte_symbols()
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
               "<|video_pad|>", "<|endoftext|>"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=special)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{{ c['text'] }}{% endfor %}<|im_end|>\n{% endfor %}")

    return offline_qwen_processor_class()(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer,
                                          video_processor=None, chat_template=template)


def qwen21(tmp: Path):
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )
    torch.manual_seed(0)
    transformer = QwenImage21Transformer2DModel(in_channels=64, out_channels=64, num_layers=1,
                                                attention_head_dim=16, num_attention_heads=2,
                                                context_in_dim=TEXT_DIM,
                                                axes_dims_rope=(4, 6, 6))
    g = torch.Generator().manual_seed(2)
    vae = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=64, dim_mult=[1, 1, 1, 1, 1],
                                   num_res_blocks=1, temperal_downsample=[False, False, False, False],
                                   latents_mean=(torch.randn(64, generator=g) * 0.5).tolist(),
                                   latents_std=(torch.rand(64, generator=g) * 2 + 0.5).tolist())
    return QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=None,
                               processor=qwen_processor(tmp / "processor"), transformer=transformer)


BUILDERS = {"taesd": sd15, "taesdxl": sdxl, "taesd3": sd3, "taef1": flux1, "taef2": flux2,
            "taef2-klein": flux2_klein, "taesana": sana, "taeqi2_1": qwen21}
SANA_SIZE = 64   # Sana's latents are 32x down: 2 x 2
QWEN_SIZE = 64   # Qwen 2.1 needs multiples of 32 (16x down, then 2x2 groups)


def variant_of(family: str) -> str:
    """The TAESD variant of a BUILDERS key ("taef2-klein" is a second FLUX.2 pipeline)."""
    return family.split("-")[0]


def size_of(family: str) -> int:
    return {"taesana": SANA_SIZE, "taeqi2_1": QWEN_SIZE}.get(variant_of(family), SIZE)


def inputs(family: str, batch: int = 1) -> dict:
    """Call arguments: a prompt for the CLIP pipelines, prompt embeddings for the others."""
    size = size_of(family)
    variant = variant_of(family)
    common = {"height": size, "width": size, "num_inference_steps": 2, "output_type": "pt"}
    if variant == "taef1":
        return {**common, **flux1_inputs(batch), "guidance_scale": 3.5}
    if family == "taef2-klein":   # Klein's guidance is real CFG: 1 turns it off (no negative prompt)
        return {**common, **flux2_inputs(batch), "guidance_scale": 1.0}
    if variant == "taef2":
        return {**common, **flux2_inputs(batch), "guidance_scale": 3.5}
    if variant == "taesana":
        return {**common, **sana_inputs(batch), "guidance_scale": 1.0, "use_resolution_binning": False}
    if variant == "taeqi2_1":
        return {**common, **flux2_inputs(batch)}
    return {**common, "prompt": ["a photo of a cat"] * batch, "guidance_scale": 1.0}


_CACHE: dict = {}


def shared(variant: str):
    """One tiny pipeline per family for the whole test session (callers must not replace its parts)."""
    if variant not in _CACHE:
        import tempfile
        pipe = BUILDERS[variant](Path(tempfile.mkdtemp(prefix=f"taesd-{variant}-")))
        pipe.set_progress_bar_config(disable=True)
        _CACHE[variant] = pipe
    return _CACHE[variant]


def fresh(variant: str, tmp: Path):
    pipe = BUILDERS[variant](tmp)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def preview_model(variant: str, weights_dir: Path | None = None):
    """The TAESD decoder previews use: fresh weights, except the real taef2."""
    import taesd
    variant = variant_of(variant)
    if variant == "taef2":  # loaded once: tests only read it
        if "taef2-model" not in _CACHE:
            _CACHE["taef2-model"] = taesd.load("taef2", weights_dir, device="cpu")
        return _CACHE["taef2-model"]
    model = taesd.create(variant, seed=0)
    # Fresh weights decode everything to near-black; brighten the last layer so that frames of
    # different latents differ visibly (and animations keep every frame).
    last = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]  # f16 ends in a shuffle
    last.weight.data *= 40
    last.bias.data.fill_(0.5)
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is much faster than two fighting over a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
