"""ComfyUI's conventions for TAESD files, as data (read from ComfyUI's own code; facts, not code).

How ComfyUI uses a one-file TAESD VAE (``taesd_encoder.*`` / ``taesd_decoder.*`` + ``vae_scale`` /
``vae_shift``, what its VAELoader builds from ``models/vae_approx`` and what its VAESave writes):
  decode(x) = taesd_decoder((x - vae_shift) * vae_scale)
  encode(x) = taesd_encoder(x) / vae_scale + vae_shift
where ``x`` is the *raw* VAE latent (ComfyUI's latent format ``process_out`` of the sampler's latent).
So the stored values are this project's latent contract taesd = (raw - shift) * scale:
  scale_shift variants  vae_scale, vae_shift = the registry's scale and shift (scalars)
  mean_std (Qwen 2.1)   vae_scale = 1 / latents_std, vae_shift = latents_mean, per channel (C x 1 x 1),
                        with the 64 statistics of ComfyUI's ``QwenImage21`` latent format, whose
                        ``process_in`` is (raw - latents_mean) / latents_std.
Which networks ComfyUI builds:
  base / f16   from the one file (the decoder's latent channels come from its shapes)
  base+pool    (taef2) only from the per-part files in ``vae_approx``: its one-file path builds the
               plain network and drops the pool branch, so taef2 gets per-part files
  f32          (taesana) no loader at all: ComfyUI has no Sana TAESD network, a file would fail
               inside ComfyUI with a size mismatch, so we refuse to write one
"""
from __future__ import annotations

from taesd.errors import TaesdError
from taesd.registry import Arch, Variant

DECODE = "taesd_decoder((x - vae_shift) * vae_scale)"
ENCODE = "taesd_encoder(x) / vae_scale + vae_shift"
ONE_FILE_ARCHS = (Arch.BASE, Arch.F16)
PER_PART_ARCHS = (Arch.BASE_POOL,)

# ComfyUI's QwenImage21 latent format (comfy/latent_formats.py): per-channel mean and std.
QWEN21_LATENTS_MEAN = (
    0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722, 1.8873, -1.7177, -0.6510, 0.2732,
    0.7562, -0.6163, -1.0277, 3.8363, 2.0210, 0.0472, 0.9320, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464,
    -0.5236, 1.2826, 3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955, -0.0342, -1.0265, -0.7636, 3.0555,
    0.0746, -3.0751, -0.1076, 1.7376, -1.0914, -1.9435, -0.2784, -1.3680, 0.4809, -0.4433, 0.3764, 0.5729,
    -2.0595, 1.0960, -1.3260, -2.0211, -5.0179, 0.5275, 4.0162, 1.8505, 0.3026, 1.9373, 1.4937, 0.2632,
    0.5547, -1.7121, -0.1562, 0.0304)
QWEN21_LATENTS_STD = (
    3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.7910, 3.0785, 3.6500, 3.9308, 3.0904,
    2.8778, 3.7675, 3.7320, 5.0756, 3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489,
    3.4896, 3.8513, 3.9323, 3.4719, 3.7498, 4.2830, 3.5694, 4.2467, 3.9037, 3.2947, 5.0770, 3.5075,
    3.2700, 3.4767, 2.8063, 5.1125, 3.5327, 4.7833, 3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875,
    3.9624, 4.0168, 3.5643, 4.0550, 5.5614, 4.2963, 4.4080, 3.4959, 3.8747, 3.7608, 3.5735, 3.1490,
    3.7662, 3.6746, 3.4563, 3.8161)
MEAN_STD = {"taeqi2_1": (QWEN21_LATENTS_MEAN, QWEN21_LATENTS_STD)}


def check_target(v: Variant) -> None:
    """Refuse a variant ComfyUI has no network for, in one line."""
    if v.arch not in ONE_FILE_ARCHS + PER_PART_ARCHS:
        raise TaesdError(f"ComfyUI has no {v.name} network ({v.arch} architecture): a comfyui file "
                         f"would fail inside ComfyUI; use --to pth or safetensors (nothing was written)")


def scale_shift(v: Variant) -> "dict[str, float | list[float]]":
    """The vae_scale / vae_shift ComfyUI needs for ``v``'s TAESD to see this project's latents."""
    if v.normalization == "scale_shift":
        return {"vae_scale": v.vae_scale, "vae_shift": v.vae_shift}
    if v.name in MEAN_STD:
        mean, std = MEAN_STD[v.name]
        return {"vae_scale": [1.0 / s for s in std], "vae_shift": list(mean)}
    raise TaesdError(f"ComfyUI keeps no vae_scale/vae_shift for {v.name} ({v.normalization} latents)")


def is_identity(extras: dict) -> bool:
    """vae_scale 1 and vae_shift 0 everywhere: what taesd 0.x wrote for taeqi2_1 before it followed
    ComfyUI's convention (decodes ComfyUI's raw latents unnormalised), never a real setting for it."""
    def values(x):
        return x if isinstance(x, (list, tuple)) else [x]
    return all(s == 1.0 for s in values(extras.get("vae_scale", 1.0))) and \
        all(s == 0.0 for s in values(extras.get("vae_shift", 0.0)))
