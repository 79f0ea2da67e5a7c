"""Cheap previews: decode at 2x or 4x smaller resolution by skipping the decoder's last upsamples.

The decoder's convolutions after each nearest 2x upsample run at 4x the pixels of the ones before
it; most of the cost sits in the last stage (512x512 output: ~55% of the FLOPs at full
resolution). Skipping the last upsample (``factor=2``) runs the last stage at half resolution,
skipping the last two (``factor=4``) also the stage before. The same weights see a coarser grid, so
the result is an approximation of the downscaled full decode; docs/performance.md reports its PSNR
against it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from taesd.errors import TaesdError

FACTORS = (1, 2, 4, 8)


def preview_decode(model, latents: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Latents -> images in [0, 1] at 1/``factor`` of the full decode's size (factor 1, 2, 4 or 8)."""
    if factor not in FACTORS:
        raise TaesdError(f"preview factor must be one of {', '.join(map(str, FACTORS))}, not {factor}")
    decoder = model.part("decoder")
    if not isinstance(decoder, nn.Sequential):
        raise TaesdError("preview decoding needs the PyTorch decoder modules; "
                         "load the model with the torch backend")
    upsamples = [i for i, m in enumerate(decoder) if isinstance(m, nn.Upsample)]
    skips = factor.bit_length() - 1
    if skips > len(upsamples):
        raise TaesdError(f"the {model.variant.name} decoder has {len(upsamples)} upsamples; "
                         f"the smallest preview is factor {2 ** len(upsamples)}")
    skipped = set(upsamples[len(upsamples) - skips:])
    # The same Sequential class (the fast executor's fuses upsample+conv pairs), minus the skipped.
    shortened = type(decoder)(*(layer for i, layer in enumerate(decoder) if i not in skipped))
    with torch.inference_mode():
        return shortened(model.prepare_latents(latents)).clamp(0, 1)
