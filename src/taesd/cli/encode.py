"""taesd encode: images -> latent files."""
from __future__ import annotations

from taesd.cli import common as c
from taesd.cli.dispatch import add_video_options, is_video_run, run_video
from taesd.io.inputs import IMAGE_SUFFIXES, read_image
from taesd.io.latents import save_latents
from taesd.io.naming import latent_name
from taesd.io.outputs import output_path
from taesd.model import encode_image


def add_parser(sub):
    p = c.command_parser(sub, "encode", "encode images into latent files",
                         "taesd encode photo.jpg --variant taef2 -o photo.taef2.safetensors",
                         "Encode images (files or folders) into latent files: .safetensors (exact) or "
                         ".png (8-bit, published layout). Sizes that are not a multiple of the downscale "
                         "factor are edge-padded; the original size is recorded and restored on decode. "
                         "Outputs are named <stem>.<variant>.<format>, beside each input or under -o "
                         "(keeping subfolders); existing outputs are refused unless --overwrite or "
                         "--skip-existing. A failing input is reported at the end (exit 2), the rest go on. "
                         "Videos (mp4/webm/mkv/mov, GIF, frame folders) and TAEHV latent files go to "
                         "`taesd video` with a TAEHV --variant (e.g. taew2_1).")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", help="output file (one input) or folder (default: beside each input)")
    p.add_argument("--format", choices=["safetensors", "png"], default="safetensors",
                   help="latent file format (default: safetensors)")
    c.add_model_options(p, video=True)
    c.add_tiling_options(p)
    add_video_options(p)
    c.add_output_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    c.check_options(args)
    if is_video_run('encode', args):
        return run_video('encode', args)
    files = c.gather_inputs(args, IMAGE_SUFFIXES, "image")
    single = len(files) == 1
    names = [latent_name(f.path.stem, args.variant, args.format) for f in files]
    planned = [(f, [output_path(args.output, f, name, single)]) for f, name in zip(files, names)]
    jobs = c.plan_outputs(args, planned, protected=c.weight_files(args))
    if not jobs:
        return 0
    model = c.open_model(args, "encoder")

    def encode_one(job):
        src, (dst,) = job
        image, warning = read_image(src.path, model.variant.image_channels)
        if warning:
            c.note(args, warning)
        latents, size = encode_image(model, image, **c.tiling_kwargs(args))
        save_latents(dst, latents if args.format == "safetensors" else latents[0], model.variant, size)
        c.say(f"{src.path} -> {dst}  ({tuple(latents.shape[1:])} latents)")

    return c.run_batch(args, jobs, encode_one, "encode")
