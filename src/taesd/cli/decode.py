"""taesd decode: latent files -> images."""
from __future__ import annotations

import json

from taesd.cli.common import (
    add_model_options,
    add_output_options,
    add_tiling_options,
    check_options,
    command_parser,
    describe_failure,
    gather_inputs,
    open_model,
    output_path,
    plan_outputs,
    report_failures,
    run_batch,
    tiling_kwargs,
    weight_files,
)
from taesd.errors import TaesdError
from taesd.io.images import crop_to, save_image
from taesd.io.inputs import LATENT_SUFFIXES
from taesd.io.latents import load_latents


def add_parser(sub):
    p = command_parser(sub, "decode", "decode latent files into images",
                       "taesd decode photo.taef2.safetensors -o photo.png",
                       "Decode latent files (.safetensors or 8-bit .png) into images. The variant is "
                       "read from the file; --variant is needed only for PNGs without taesd metadata. "
                       "Every input is read and checked before any decoding (all problems are listed, "
                       "exit 2). Outputs: <stem>.decoded.png (the .<variant> part of the stem dropped), "
                       "beside each input or under -o (keeping subfolders); existing outputs are refused "
                       "unless --overwrite or --skip-existing.")
    p.add_argument("inputs", nargs="+", help="latent files or folders")
    p.add_argument("-o", "--output",
                   help="output image file (one input) or folder (default: beside each input)")
    add_model_options(p, variant_required=False)
    add_tiling_options(p)
    add_output_options(p)
    p.set_defaults(run=run)


def read_latents(path, variant):
    """load_latents, with malformed metadata and empty tensors as one-line errors."""
    try:
        latents, v, size = load_latents(path, variant)
    except TaesdError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, json.JSONDecodeError) as e:
        raise TaesdError(f"{path}: malformed taesd metadata ({str(e).splitlines()[0][:100]})") from e
    if latents.numel() == 0:
        raise TaesdError(f"{path} holds empty latents (shape {tuple(latents.shape)})")
    if size is not None and (len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size)):
        raise TaesdError(f"{path}: malformed taesd image_size {list(size)}; expected [height, width]")
    return latents, v, size


def _stem(src, variant: str) -> str:
    stem = src.path.stem
    return stem[: -len(variant) - 1] if stem.lower().endswith("." + variant) else stem


def run(args) -> int:
    check_options(args)
    files = gather_inputs(args, LATENT_SUFFIXES, "latent")
    loaded, failures = [], []
    for f in files:   # read and check everything before any decoding
        try:
            loaded.append(read_latents(f.path, args.variant))
        except TaesdError as e:
            if args.fail_fast:
                raise TaesdError(describe_failure(f.path, e)) from e
            failures.append(describe_failure(f.path, e))
    if failures:
        return report_failures(args, failures, len(files), "nothing was decoded")
    variants = {v.name for _, v, _ in loaded}
    if len(variants) > 1:
        raise TaesdError(f"the inputs mix latents of {', '.join(sorted(variants))}; "
                         f"decode one variant at a time")
    args.variant = variants.pop()
    single = len(files) == 1 and loaded[0][0].shape[0] == 1
    planned = []
    for f, (latents, v, size) in zip(files, loaded):
        n = latents.shape[0]
        suffixes = [".decoded.png"] if n == 1 else [f".{i}.decoded.png" for i in range(n)]
        planned.append((f, [output_path(args.output, f, s, single, _stem(f, v.name)) for s in suffixes]))
    jobs = plan_outputs(args, planned, protected=weight_files(args))
    if not jobs:
        return 0
    by_file = {f.path: item for f, item in zip(files, loaded)}
    model = open_model(args, "decoder")

    def decode_one(job):
        src, dsts = job
        latents, v, size = by_file[src.path]
        images = model.decode(latents, **tiling_kwargs(args))
        for image, dst in zip(images, dsts):
            save_image(crop_to(image, size), dst)
            if single:
                print(f"{src.path} -> {dst}  ({image.shape[-1]}x{image.shape[-2]})")

    return run_batch(args, jobs, decode_one, "decode")
