"""taesd roundtrip: image -> latents -> image, with PSNR and SSIM against the input."""
from __future__ import annotations

import statistics

from taesd.cli import common as c
from taesd.cli.dispatch import add_video_options, is_video_run, run_video
from taesd.evaluation.metrics import check_ssim_size, psnr, ssim
from taesd.io.images import check_writable_size, save_image
from taesd.io.inputs import IMAGE_SUFFIXES, read_image
from taesd.io.latents import dequantize, quantize
from taesd.io.naming import roundtrip_name
from taesd.io.outputs import output_path
from taesd.model import encode_image


def add_parser(sub):
    p = c.command_parser(sub, "roundtrip", "encode and decode images, print PSNR/SSIM",
                         "taesd roundtrip astronaut.png --variant taef2 --latents png -o astronaut.rt.png",
                         "Encode then decode each image, write the result and print PSNR (dB) and SSIM "
                         "against the input. --latents png stores the latents as 8 bits in between, as "
                         "a latent PNG would. Outputs: <stem>.<variant>.roundtrip.png beside each input or "
                         "under -o (keeping subfolders); existing outputs are refused unless --overwrite "
                         "or --skip-existing. A failing input is reported at the end (exit 2), the rest "
                         "go on. Videos (mp4/webm/mkv/mov, GIF, frame folders) and TAEHV latent files go to "
                         "`taesd video` with a TAEHV --variant (e.g. taew2_1).")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output",
                   help="output image file (one input) or folder (default: beside each input)")
    p.add_argument("--latents", choices=["exact", "png"], default="exact",
                   help="keep latents exact, or quantize them to 8 bits like a latent PNG")
    c.add_model_options(p, video=True)
    c.add_tiling_options(p)
    add_video_options(p)
    c.add_output_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    c.check_options(args)
    if is_video_run('roundtrip', args):
        return run_video('roundtrip', args)
    files = c.gather_inputs(args, IMAGE_SUFFIXES, "image")
    single = len(files) == 1
    planned = [(f, [output_path(args.output, f, roundtrip_name(f.path.stem, args.variant), single)])
               for f in files]
    jobs = c.plan_outputs(args, planned, protected=c.weight_files(args))
    if not jobs:
        return 0
    model = c.open_model(args, ("encoder", "decoder"))
    rows = []

    def roundtrip_one(job):
        src, (dst,) = job
        original, warning = read_image(src.path, model.variant.image_channels)
        if warning:
            c.note(args, warning)
        check_ssim_size(original)   # before any work or output
        check_writable_size(dst, *original.shape[-2:])
        latents, size = encode_image(model, original, **c.tiling_kwargs(args))
        if args.latents == "png":
            latents = dequantize(quantize(latents))
        decoded = model.decode(latents, size=size, **c.tiling_kwargs(args)).float().cpu()
        p, s = psnr(decoded, original[None]).item(), ssim(decoded, original[None]).item()
        save_image(decoded[0], dst)
        rows.append((p, s))
        c.say(f"{src.path}: PSNR {p:.2f} dB  SSIM {s:.4f}  -> {dst}")

    code = c.run_batch(args, jobs, roundtrip_one, "roundtrip")
    if len(rows) > 1:
        print(f"mean over {len(rows)} images: PSNR {statistics.mean(r[0] for r in rows):.2f} dB  "
              f"SSIM {statistics.mean(r[1] for r in rows):.4f}")
    return code
