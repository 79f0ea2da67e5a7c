"""taesd decode: latent files -> images."""
from __future__ import annotations

from taesd.errors import TaesdError
from taesd.io.inputs import LATENT_SUFFIXES, expand_inputs
from taesd.io.images import crop_to, save_image
from taesd.io.latents import load_latents
from taesd.cli.common import (add_model_options, add_tiling_options, command_parser, open_model, output_path,
                     progress, tiling_kwargs)


def add_parser(sub):
    p = command_parser(sub, "decode", "decode latent files into images",
                       "taesd decode photo.taef2.safetensors -o photo.png",
                       "Decode latent files (.safetensors or 8-bit .png) into images. The variant is "
                       "read from the file; --variant is needed only for PNGs without taesd metadata.")
    p.add_argument("inputs", nargs="+", help="latent files or folders")
    p.add_argument("-o", "--output", help="output image file (one input) or folder (default: beside each input)")
    add_model_options(p, variant_required=False)
    add_tiling_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    files = expand_inputs(args.inputs, LATENT_SUFFIXES, "latent")
    loaded = [load_latents(f, args.variant) for f in files]  # fail early, before any decoding
    variants = {v.name for _, v, _ in loaded}
    if len(variants) > 1:
        raise TaesdError(f"the inputs mix latents of {', '.join(sorted(variants))}; decode one variant at a time")
    args.variant = variants.pop()
    model = open_model(args, "decoder")
    for src, (latents, v, size) in progress(list(zip(files, loaded)), "decode"):
        images = model.decode(latents, **tiling_kwargs(args))
        for i, image in enumerate(images):
            suffix = ".decoded.png" if len(images) == 1 else f".{i}.decoded.png"
            dst = output_path(args.output, src, suffix, len(files) == 1 and len(images) == 1)
            save_image(crop_to(image, size), dst)
            if len(files) == 1:
                print(f"{src} -> {dst}  ({image.shape[-1]}x{image.shape[-2]})")
    return 0
