"""taesd encode: images -> latent files."""
from __future__ import annotations

from taesd.io.inputs import IMAGE_SUFFIXES, expand_inputs
from taesd.io.images import load_image, pad_to_multiple
from taesd.io.latents import save_latents
from taesd.cli.common import (add_model_options, add_tiling_options, command_parser, open_model, output_path,
                     progress, tiling_kwargs)


def add_parser(sub):
    p = command_parser(sub, "encode", "encode images into latent files",
                       "taesd encode photo.jpg --variant taef2 -o photo.taef2.safetensors",
                       "Encode images (files or folders) into latent files: .safetensors (exact) or "
                       ".png (8-bit, published layout). Sizes that are not a multiple of the downscale "
                       "factor are edge-padded; the original size is recorded and restored on decode.")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", help="output file (one input) or folder (default: beside each input)")
    p.add_argument("--format", choices=["safetensors", "png"], default="safetensors",
                   help="latent file format (default: safetensors)")
    add_model_options(p)
    add_tiling_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    files = expand_inputs(args.inputs, IMAGE_SUFFIXES, "image")
    model = open_model(args, "encoder")
    v = model.variant
    for src in progress(files, "encode"):
        image, size = pad_to_multiple(load_image(src, v.image_channels), v.downscale)
        latents = model.encode(image[None], **tiling_kwargs(args))
        dst = output_path(args.output, src, f".{v.name}.{args.format}", len(files) == 1)
        save_latents(dst, latents if args.format == "safetensors" else latents[0], v, size)
        if len(files) == 1:
            print(f"{src} -> {dst}  ({tuple(latents.shape[1:])} latents)")
    return 0
