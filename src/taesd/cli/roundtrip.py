"""taesd roundtrip: image -> latents -> image, with PSNR and SSIM against the input."""
from __future__ import annotations

from taesd.io.inputs import IMAGE_SUFFIXES, expand_inputs
from taesd.io.images import crop_to, load_image, pad_to_multiple, save_image
from taesd.io.latents import dequantize, quantize
from taesd.evaluation.metrics import psnr, ssim
from taesd.cli.common import (add_model_options, add_tiling_options, command_parser, open_model, output_path,
                     progress, tiling_kwargs)


def add_parser(sub):
    p = command_parser(sub, "roundtrip", "encode and decode images, print PSNR/SSIM",
                       "taesd roundtrip astronaut.png --variant taef2 --latents png -o astronaut.rt.png",
                       "Encode then decode each image, write the result and print PSNR (dB) and SSIM "
                       "against the input. --latents png stores the latents as 8 bits in between, as "
                       "a latent PNG would.")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", help="output image file (one input) or folder (default: beside each input)")
    p.add_argument("--latents", choices=["exact", "png"], default="exact",
                   help="keep latents exact, or quantize them to 8 bits like a latent PNG")
    add_model_options(p)
    add_tiling_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    files = expand_inputs(args.inputs, IMAGE_SUFFIXES, "image")
    model = open_model(args, ("encoder", "decoder"))
    v = model.variant
    rows = []
    bar = progress(files, "roundtrip")
    for src in bar:
        original = load_image(src, v.image_channels)
        padded, size = pad_to_multiple(original, v.downscale)
        latents = model.encode(padded[None], **tiling_kwargs(args))
        if args.latents == "png":
            latents = dequantize(quantize(latents))
        decoded = crop_to(model.decode(latents, **tiling_kwargs(args)), size).float().cpu()
        dst = output_path(args.output, src, f".{v.name}.roundtrip.png", len(files) == 1)
        save_image(decoded[0], dst)
        p, s = psnr(decoded, original[None]).item(), ssim(decoded, original[None]).item()
        rows.append((src, p, s))
        bar.write(f"{src}: PSNR {p:.2f} dB  SSIM {s:.4f}  -> {dst}")
    if len(rows) > 1:
        import statistics
        ps, ss = [r[1] for r in rows], [r[2] for r in rows]
        print(f"mean over {len(rows)} images: PSNR {statistics.mean(ps):.2f} dB  SSIM {statistics.mean(ss):.4f}")
    return 0
