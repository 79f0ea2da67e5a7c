"""taesd roundtrip: image -> latents -> image, with PSNR and SSIM against the input."""
from __future__ import annotations

import statistics

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
from taesd.evaluation.metrics import check_ssim_size, psnr, ssim
from taesd.io.images import crop_to, pad_to_multiple, save_image
from taesd.io.inputs import IMAGE_SUFFIXES, read_image
from taesd.io.latents import dequantize, quantize


def add_parser(sub):
    p = command_parser(sub, "roundtrip", "encode and decode images, print PSNR/SSIM",
                       "taesd roundtrip astronaut.png --variant taef2 --latents png -o astronaut.rt.png",
                       "Encode then decode each image, write the result and print PSNR (dB) and SSIM "
                       "against the input. --latents png stores the latents as 8 bits in between, as "
                       "a latent PNG would. Outputs: <stem>.<variant>.roundtrip.png beside each input or "
                       "under -o (keeping subfolders); existing outputs are refused unless --overwrite "
                       "or --skip-existing. A failing input is reported at the end (exit 2), the rest go on.")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output",
                   help="output image file (one input) or folder (default: beside each input)")
    p.add_argument("--latents", choices=["exact", "png"], default="exact",
                   help="keep latents exact, or quantize them to 8 bits like a latent PNG")
    add_model_options(p)
    add_tiling_options(p)
    add_output_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    check_options(args)
    files = gather_inputs(args, IMAGE_SUFFIXES, "image")
    suffix = f".{args.variant}.roundtrip.png"
    single = len(files) == 1
    jobs = plan_outputs(args, [(f, [output_path(args.output, f, suffix, single)]) for f in files],
                        protected=weight_files(args))
    if not jobs:
        return 0
    model = open_model(args, ("encoder", "decoder"))
    v = model.variant
    rows = []

    def roundtrip_one(job):
        src, (dst,) = job
        original, warning = read_image(src.path, v.image_channels)
        if warning:
            note(args, warning)
        check_ssim_size(original)   # before any work or output
        padded, size = pad_to_multiple(original, v.downscale)
        latents = model.encode(padded[None], **tiling_kwargs(args))
        if args.latents == "png":
            latents = dequantize(quantize(latents))
        decoded = crop_to(model.decode(latents, **tiling_kwargs(args)), size).float().cpu()
        p, s = psnr(decoded, original[None]).item(), ssim(decoded, original[None]).item()
        save_image(decoded[0], dst)
        rows.append((src, p, s))
        print(f"{src.path}: PSNR {p:.2f} dB  SSIM {s:.4f}  -> {dst}", flush=True)

    code = run_batch(args, jobs, roundtrip_one, "roundtrip")
    if len(rows) > 1:
        ps, ss = [r[1] for r in rows], [r[2] for r in rows]
        print(f"mean over {len(rows)} images: PSNR {statistics.mean(ps):.2f} dB  "
              f"SSIM {statistics.mean(ss):.4f}")
    return code
