"""A TAESD as diffusers' own ``AutoencoderTiny``: the portable form of the base variants (taesd,
taesdxl, taesd3, taef1), whose network AutoencoderTiny implements. A pipeline saved with it
(``pipe.vae = pipe.vae.to_autoencoder_tiny(); pipe.save_pretrained(...)``) names
``["diffusers", "AutoencoderTiny"]`` in its model_index.json and loads where taesd is not installed.
The other variants (taef2, taesana, taeqi2_1, ...) have no diffusers class: their saved pipelines name
``["taesd", "TaesdVAE"]`` and load once ``import taesd`` has run.
"""
from __future__ import annotations

from taesd.errors import TaesdError
from taesd.io.weights.formats import diffusers_config, state_dicts, to_diffusers_keys
from taesd.model import TAESD
from taesd.registry import PARTS, Arch


def autoencoder_tiny(model: TAESD):
    """A diffusers ``AutoencoderTiny`` holding the weights of ``model`` (taesd/taesdxl/taesd3/taef1),
    on its device and dtype; its config keeps TAESD's latents as they are (scaling 1, shift 0)."""
    from diffusers import AutoencoderTiny
    v = model.variant
    if v.arch != Arch.BASE:
        raise TaesdError(f"diffusers' AutoencoderTiny cannot hold {v.name} ({v.arch} architecture), so it "
                         f"has no portable form; a pipeline saved with TaesdVAE loads after `import taesd`")
    missing = [p for p in PARTS if p not in model.parts]
    if missing:
        raise TaesdError(f"AutoencoderTiny needs both parts; this {v.name} has no {missing[0]}: "
                         f"load it with parts=('encoder', 'decoder')")
    config = {k: val for k, val in diffusers_config(v).items() if not k.startswith("_")}
    vae = AutoencoderTiny.from_config(config)
    vae.load_state_dict(to_diffusers_keys(state_dicts(model)))
    return vae.to(device=model.device, dtype=model.dtype).eval().requires_grad_(False)
