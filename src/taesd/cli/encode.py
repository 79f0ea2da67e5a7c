"""taesd encode: images -> latent files."""
from __future__ import annotations

from taesd.cli.common import (
    add_model_options,
    add_output_options,
    add_tiling_options,
    check_options,
    command_parser,
    gather_inputs,
    note,
    open_model,
    output_path,
    plan_outputs,
    run_batch,
    tiling_kwargs,
    weight_files,
)
from taesd.io.images import pad_to_multiple
from taesd.io.inputs import IMAGE_SUFFIXES, read_image
from taesd.io.latents import save_latents


def add_parser(sub):
    p = command_parser(sub, "encode", "encode images into latent files",
                       "taesd encode photo.jpg --variant taef2 -o photo.taef2.safetensors",
                       "Encode images (files or folders) into latent files: .safetensors (exact) or "
                       ".png (8-bit, published layout). Sizes that are not a multiple of the downscale "
                       "factor are edge-padded; the original size is recorded and restored on decode. "
                       "Outputs are named <stem>.<variant>.<format>, beside each input or under -o "
                       "(keeping subfolders); existing outputs are refused unless --overwrite or "
                       "--skip-existing. A failing input is reported at the end (exit 2), the rest go on.")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", help="output file (one input) or folder (default: beside each input)")
    p.add_argument("--format", choices=["safetensors", "png"], default="safetensors",
                   help="latent file format (default: safetensors)")
    add_model_options(p)
    add_tiling_options(p)
    add_output_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    check_options(args)
    files = gather_inputs(args, IMAGE_SUFFIXES, "image")
    suffix = f".{args.variant}.{args.format}"
    single = len(files) == 1
    jobs = plan_outputs(args, [(f, [output_path(args.output, f, suffix, single)]) for f in files],
                        protected=weight_files(args))
    if not jobs:
        return 0
    model = open_model(args, "encoder")
    v = model.variant

    def encode_one(job):
        src, (dst,) = job
        image, warning = read_image(src.path, v.image_channels)
        if warning:
            note(args, warning)
        image, size = pad_to_multiple(image, v.downscale)
        latents = model.encode(image[None], **tiling_kwargs(args))
        save_latents(dst, latents if args.format == "safetensors" else latents[0], v, size)
        if single:
            print(f"{src.path} -> {dst}  ({tuple(latents.shape[1:])} latents)")

    return run_batch(args, jobs, encode_one, "encode")
