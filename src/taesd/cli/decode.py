"""taesd decode: latent files -> images."""
from __future__ import annotations

from taesd.cli import common as c
from taesd.cli.dispatch import add_video_options, is_video_run, run_video
from taesd.errors import TaesdError
from taesd.io.images import check_writable_size, save_image
from taesd.io.inputs import LATENT_SUFFIXES
from taesd.io.latents import load_latents
from taesd.io.naming import decoded_names
from taesd.io.outputs import output_path


def add_parser(sub):
    p = c.command_parser(sub, "decode", "decode latent files into images",
                         "taesd decode photo.taef2.safetensors -o photo.png",
                         "Decode latent files (.safetensors or 8-bit .png) into images. The variant is "
                         "read from the file; --variant is needed only for PNGs without taesd metadata. "
                         "Every input is read and checked before any decoding (all problems are listed, "
                         "exit 2). Outputs: <stem>.decoded.png (the .<variant> part of the stem dropped), "
                         "beside each input or under -o (keeping subfolders); existing outputs are refused "
                         "unless --overwrite or --skip-existing. "
                         "Videos (mp4/webm/mkv/mov, GIF, frame folders) and TAEHV latent files go to "
                         "`taesd video` with a TAEHV --variant (e.g. taew2_1).")
    p.add_argument("inputs", nargs="+", help="latent files or folders")
    p.add_argument("-o", "--output",
                   help="output image file (one input) or folder (default: beside each input)")
    c.add_model_options(p, variant_required=False, video=True)
    c.add_tiling_options(p)
    add_video_options(p)
    c.add_output_options(p)
    p.set_defaults(run=run)


def read_all(args, files) -> "tuple[list, int]":
    """Every input read and checked before any decoding: (the loaded latents, exit code)."""
    loaded, failures = [], []
    for f in files:
        try:
            loaded.append(load_latents(f.path, args.variant))
        except TaesdError as e:
            if args.fail_fast:
                raise TaesdError(c.describe_failure(f.path, e)) from e
            failures.append(c.describe_failure(f.path, e))
    if failures:
        return loaded, c.report_failures(args, failures, len(files), "nothing was decoded")
    variants = {v.name for _, v, _ in loaded}
    if len(variants) > 1:
        raise TaesdError(f"the inputs mix latents of {', '.join(sorted(variants))}; "
                         f"decode one variant at a time")
    args.variant = variants.pop()
    return loaded, 0


def run(args) -> int:
    c.check_options(args)
    if is_video_run('decode', args):
        return run_video('decode', args)
    files = c.gather_inputs(args, LATENT_SUFFIXES, "latent")
    loaded, code = read_all(args, files)
    if code:
        return code
    single = len(files) == 1 and loaded[0][0].shape[0] == 1
    planned = []
    for f, (latents, v, size) in zip(files, loaded):
        dsts = [output_path(args.output, f, name, single)
                for name in decoded_names(f.path.stem, v.name, latents.shape[0])]
        h, w = size or (latents.shape[-2] * v.downscale, latents.shape[-1] * v.downscale)
        for dst in dsts:
            check_writable_size(dst, h, w)   # before any decoding
        planned.append((f, dsts))
    jobs = c.plan_outputs(args, planned, protected=c.weight_files(args))
    if not jobs:
        return 0
    by_file = {f.path: item for f, item in zip(files, loaded)}
    model = c.open_model(args, "decoder")

    def decode_one(job):
        src, dsts = job
        latents, v, size = by_file[src.path]
        images = model.decode(latents, size=size, **c.tiling_kwargs(args))
        for image, dst in zip(images, dsts):
            save_image(image, dst)
            c.say(f"{src.path} -> {dst}  ({image.shape[-1]}x{image.shape[-2]})")

    return c.run_batch(args, jobs, decode_one, "decode")
