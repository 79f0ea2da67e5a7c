"""``TaesdVAE``: every TAESD variant as a diffusers model, a drop-in ``pipe.vae`` for its family.

    from taesd.integrations.diffusers import TaesdVAE
    pipe.vae = TaesdVAE.from_pretrained("madebyollin/taef2")      # or a local folder / file
    pipe.vae = TaesdVAE.from_taesd(taesd.load("taesana"))          # or a loaded model

Contract (diffusers' VAE conventions, our network and executor):
- ``encode(images)`` takes images in [-1, 1] and returns ``.latents`` (``return_dict=False``: a tuple);
  ``decode(latents)`` returns ``.sample`` in [-1, 1]. Qwen Image 2.1 (taeqi2_1) takes and returns a
  frame axis (N x C x 1 x h x w), as its pipeline hands over and expects.
- Latents are TAESD's: the config makes each family's pipeline conversion the identity, so the
  pipeline's own unpack/normalise code lands exactly on them: scaling_factor 1 and shift_factor 0;
  FLUX.2's ``bn`` with mean 0, variance 1 and ``batch_norm_eps`` 0; Qwen 2.1's latents_mean 0 and
  latents_std 1 (``z_dim`` 64). ``block_out_channels`` / ``encoder_block_out_channels`` have
  log2(downscale) + 1 entries, which is how pipelines compute their VAE scale factor.
- Inputs are cast to the model's dtype and device; outputs come back in the input's dtype.
- ``enable_tiling(tile_size)`` runs our seam-exact tiling (taesd.tiling: equal to the untiled
  pass up to float rounding), ``enable_slicing()`` one image of the batch at a time.
- The network runs through the executor ``taesd.runtime.executors.resolve`` picks for the model's device,
  as ``taesd.load`` does ("fast": the CUDA executor on a GPU, Winograd/oneDNN on a CPU); after
  ``.to()`` / ``.half()`` / ``.cuda()`` the next call runs the new device's and dtype's executor.
- ``save_pretrained`` writes config.json + diffusion_pytorch_model.safetensors with AutoencoderTiny's
  keys (``encoder.layers.N``, ``decoder.layers.N-1``; plus ``bn.*`` for taef2), which every reader of
  ours (and AutoencoderTiny, for the base variants) loads back bit-exactly. ``from_pretrained`` reads
  that folder, a diffusers AutoencoderTiny folder, a combined file (taef2.safetensors), a folder of
  our per-part files, or a hub repo of any of those.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from taesd.errors import TaesdError
from taesd.io.weights.formats import from_diffusers_keys, to_diffusers_keys
from taesd.model import TAESD
from taesd.registry import PARTS, get_variant
from taesd.runtime import executors
from taesd.runtime.dtypes import default_dtype

CONFIG_NAME = "config.json"
DEFAULT_TILE_PIXELS = 512      # enable_tiling() without a size: 512 image pixels per tile side


@dataclass
class TaesdEncoderOutput(BaseOutput):
    """What ``TaesdVAE.encode`` returns: ``latents`` in TAESD's (= the diffusion model's) space."""
    latents: torch.Tensor


def family_config(variant) -> dict:
    """The config entries a family's pipeline reads from ``vae.config``, set so its conversion is
    the identity on TAESD's latents."""
    v = get_variant(variant)
    levels = [64] * (int(math.log2(v.downscale)) + 1)   # 2 ** (len - 1) == downscale
    cfg = {"in_channels": v.image_channels, "out_channels": v.image_channels,
           "latent_channels": v.latent_channels, "scaling_factor": 1.0, "shift_factor": 0.0,
           "block_out_channels": levels, "encoder_block_out_channels": levels,
           "decoder_block_out_channels": levels, "force_upcast": False,
           "latents_mean": None, "latents_std": None, "batch_norm_eps": None, "patch_size": None,
           "z_dim": None}
    if v.normalization == "batchnorm":
        cfg.update(batch_norm_eps=0.0, patch_size=[2, 2])
    if v.normalization == "mean_std":
        cfg.update(latents_mean=[0.0] * v.latent_channels, latents_std=[1.0] * v.latent_channels,
                   z_dim=v.latent_channels)
    return cfg


def _executor_choice(executor):
    """A name or an ``Executor``, checked: it must run the modules in place (not ONNX Runtime)."""
    checked = executors.resolve(executor, "cpu")
    if checked.name == "onnxruntime":
        raise TaesdError("TaesdVAE runs the PyTorch modules; use executor 'fast', 'cuda', 'cpu', "
                         "'compile' or 'plain', not 'onnxruntime'")
    return executor if isinstance(executor, str) or executor is None else checked


def _executor_name(choice) -> str:
    """What config.json records: a name ("fast" for the device's choice)."""
    if choice is None or isinstance(choice, str):
        return choice or "fast"
    return "fast" if choice.auto else choice.name


class TaesdVAE(ModelMixin, ConfigMixin):
    """A TAESD variant behind diffusers' VAE interface (see the module docstring)."""

    config_name = CONFIG_NAME
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, taesd_variant: str = "taesd", in_channels: int | None = None,
                 out_channels: int | None = None, latent_channels: int | None = None,
                 scaling_factor: float = 1.0, shift_factor: float = 0.0, block_out_channels=None,
                 encoder_block_out_channels=None, decoder_block_out_channels=None,
                 force_upcast: bool = False, latents_mean=None, latents_std=None,
                 batch_norm_eps: float | None = None, patch_size=None, z_dim: int | None = None,
                 executor="fast"):
        super().__init__()
        v = get_variant(taesd_variant)
        derived = family_config(v)
        given = {"in_channels": in_channels, "out_channels": out_channels, "latent_channels": latent_channels,
                 "scaling_factor": scaling_factor, "shift_factor": shift_factor, "latents_mean": latents_mean,
                 "latents_std": latents_std, "batch_norm_eps": batch_norm_eps}
        for key, value in given.items():
            if value is not None and value != derived[key]:
                # Another value would make the pipeline's conversion something other than the identity.
                raise TaesdError(f"{v.name}: config {key}={value!r} would move the pipeline's latents off "
                                 f"TAESD's (it must be {derived[key]!r}); remove it from config.json")
        choice = _executor_choice(executor)
        self.register_to_config(taesd_variant=v.name, executor=_executor_name(choice), **derived)
        self.taesd = TAESD(v, PARTS).eval()
        if v.normalization == "batchnorm":  # FLUX.2: the pipeline's BatchNorm inverse, as the identity
            self.bn = nn.BatchNorm2d(4 * v.latent_channels, eps=0.0, affine=False, track_running_stats=True)
        self.use_tiling, self.use_slicing = False, False
        self.tile_size: int | None = None
        self._executor_choice = choice
        self._executor_ready = False
        self.requires_grad_(False)

    # ------------------------------------------------------------ construction

    @property
    def variant(self):
        return get_variant(self.config.taesd_variant)

    @classmethod
    def from_taesd(cls, model: TAESD, executor=None, share: bool = False) -> "TaesdVAE":
        """The diffusers form of a loaded TAESD (both parts needed), on its device and dtype, run by
        ``executor`` (default: the model's own choice, else "fast"). ``share=True`` takes ``model``
        itself, executor included (for a model nobody else uses: ``use_taesd_vae``'s own load)."""
        missing = [p for p in PARTS if p not in model.parts]
        if missing:
            raise TaesdError(f"TaesdVAE needs both parts; this {model.variant.name} has no {missing[0]}: "
                             f"load it with parts=('encoder', 'decoder')")
        if executor is None:
            own = getattr(model, "executor", None)
            executor = "fast" if own is None or own.auto else own
        vae = cls(taesd_variant=model.variant.name, executor=executor)
        if share:
            for name, child in vae.named_children():   # FLUX.2's bn: on the model's device and dtype
                if name != "taesd":
                    child.to(device=model.device, dtype=model.dtype)
            vae.taesd = model
            vae._executor_ready = getattr(model, "executor", None) == vae._resolve_executor()
            return vae.eval()
        for part in PARTS:
            getattr(vae.taesd, part).load_state_dict(getattr(model, part).state_dict())
        return vae.to(device=model.device, dtype=model.dtype).eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, taesd_variant: str | None = None,
                        subfolder: str | None = None, torch_dtype=None, device=None,
                        revision: str | None = None, executor: str | None = None, dtype=None,
                        **_) -> "TaesdVAE":
        """Load from a TaesdVAE or AutoencoderTiny folder, a weight file, a folder of per-part files,
        or a hub repo of any of those. Other diffusers loading options are accepted and ignored."""
        from taesd.integrations.diffusers.layouts import locate
        path, variant, config = locate(pretrained_model_name_or_path, taesd_variant, subfolder, revision)
        from taesd.loader import load
        model = load(variant, weights=path, device="cpu", dtype="fp32", executor="plain")
        vae = cls(taesd_variant=variant, executor=executor or config.get("executor", "fast"))
        for part in PARTS:
            getattr(vae.taesd, part).load_state_dict(model.part(part).state_dict())
        vae.eval()
        torch_dtype = torch_dtype if torch_dtype is not None else dtype   # diffusers passes torch_dtype
        vae._dtype_asked = torch_dtype is not None   # computes in it (no automatic bf16 on bf16 CPUs)
        if device is None and torch_dtype is None:
            return vae
        # No dtype: the library's one rule for the device (fp16 on a tensor-core GPU), as taesd.load.
        return vae.to(device=device, dtype=default_dtype(device, torch_dtype))

    def to_autoencoder_tiny(self):
        """diffusers' own ``AutoencoderTiny`` with these weights (taesd/taesdxl/taesd3/taef1): a pipeline
        saved with it loads where taesd is not installed (taesd.integrations.diffusers.portable)."""
        from taesd.integrations.diffusers.portable import autoencoder_tiny
        return autoencoder_tiny(self.taesd)

    # ------------------------------------------------------------ saving: AutoencoderTiny's keys

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        if args or destination is not None:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        own = super().state_dict(prefix="", keep_vars=keep_vars)
        parts = {p: {k[len(f"taesd.{p}."):]: t for k, t in own.items() if k.startswith(f"taesd.{p}.")}
                 for p in PARTS}
        out = to_diffusers_keys(parts)
        out.update({k: t for k, t in own.items() if not k.startswith("taesd.")})
        return {prefix + k: t for k, t in out.items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        ours = {f"taesd.{p}.{k}": t
                for p, sd in from_diffusers_keys(state_dict).items() for k, t in sd.items()}
        ours.update({k: t for k, t in state_dict.items() if not k.startswith(("encoder.", "decoder."))})
        self._executor_ready = False
        return super().load_state_dict(ours, strict=strict, assign=assign)

    # ------------------------------------------------------------ diffusers' switches

    def enable_tiling(self, tile_size: int | None = None, **_) -> None:
        """Seam-exact tiles of ``tile_size`` latent pixels (default: 512 image pixels' worth).
        diffusers' blending options (tile_sample_min_size, overlap factors) do not apply: tiles
        here do not blend, they compute each region exactly."""
        self.use_tiling = True
        self.tile_size = tile_size or max(8, DEFAULT_TILE_PIXELS // self.variant.downscale)

    def disable_tiling(self) -> None:
        self.use_tiling, self.tile_size = False, None

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    # ------------------------------------------------------------ running

    def _resolve_executor(self) -> "executors.Executor":
        executor = executors.resolve(self._executor_choice, self.taesd.device)
        asked = self.dtype if getattr(self, "_dtype_asked", False) else None
        return executors.exact_if_asked(executor, asked)

    @property
    def executor(self) -> "executors.Executor":
        """The executor the network runs with (resolved for its device, applied on first use)."""
        return self.running_model().executor

    def running_model(self) -> TAESD:
        """The TAESD inside, set up with the executor ``resolve`` picks for its device and dtype."""
        if not self._executor_ready:
            self._resolve_executor().apply(self.taesd)
            self._executor_ready = True
        return self.taesd


    def to(self, *args, **kwargs):
        # nn.Module's: diffusers' own warns about fp32-kept modules on every dtype cast (this model has none).
        return nn.Module.to(self, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda(): back to the plain modules; the next call resolves the executor
        # for the new device and dtype (and packs weights again for the new tensors).
        self._executor_ready = False
        current = getattr(self.taesd, "executor", None)
        if current is not None:
            current.undo(self.taesd)
        return super()._apply(fn, *args, **kwargs)

    def _batches(self, x: torch.Tensor):
        return x.split(1) if self.use_slicing and x.shape[0] > 1 else (x,)

    def _frames_in(self, x: torch.Tensor, what: str) -> tuple[torch.Tensor, bool]:
        if x.ndim == 5:
            if x.shape[2] != 1:
                raise TaesdError(f"{what} with {x.shape[2]} frames are video; "
                                 f"TAESD handles one frame (N x C x 1 x h x w)")
            return x[:, :, 0], True
        if x.ndim != 4:
            raise TaesdError(f"{what} must be N x C x h x w (or N x C x 1 x h x w), "
                             f"got shape {tuple(x.shape)}")
        return x, False

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images in [-1, 1] -> ``TaesdEncoderOutput(latents=...)``, in ``x``'s dtype."""
        x4, frames = self._frames_in(x, "images")
        model = self.running_model()
        tile = self.tile_size if self.use_tiling else None
        z = torch.cat([model.encode(b.to(model.dtype).add(1).div(2), tile_size=tile)
                       for b in self._batches(x4)])
        z = z.to(x.dtype if x.is_floating_point() else model.dtype)
        z = z[:, :, None] if frames else z
        return TaesdEncoderOutput(latents=z) if return_dict else (z,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None, **_):
        """Latents -> ``DecoderOutput(sample=images in [-1, 1])``, in ``z``'s dtype."""
        z4, frames = self._frames_in(z, "latents")
        model = self.running_model()
        tile = self.tile_size if self.use_tiling else None
        images = torch.cat([model.decode(b.to(model.dtype), tile_size=tile) for b in self._batches(z4)])
        images = images.mul(2).sub(1).to(z.dtype)
        images = images[:, :, None] if frames else images
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        """Encode then decode (diffusers' VAE ``forward``)."""
        image = self.decode(self.encode(sample).latents).sample
        return DecoderOutput(sample=image) if return_dict else (image,)


# A saved pipeline names ["taesd", "TaesdVAE"] in model_index.json (diffusers records __module__), which
# loads once `import taesd` has run (taesd.__getattr__ gives the class), not only after this module.
TaesdVAE.__module__ = "taesd"
