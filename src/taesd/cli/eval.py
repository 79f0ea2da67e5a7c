"""taesd eval: PSNR/SSIM (exact and 8-bit latents) and latent error of TAESD variants on images."""
from __future__ import annotations

from taesd.io.inputs import IMAGE_SUFFIXES, expand_inputs
from taesd.registry import VARIANTS
from taesd.cli.common import command_parser, progress


def add_parser(sub):
    p = command_parser(sub, "eval", "measure TAESD variants (and a teacher VAE) on a folder of images",
                       "taesd eval photos/ --variant taef2 --teacher vae/flux2 --family taef2 -o eval/",
                       "Round-trip every image through each variant; print mean +- std of PSNR, SSIM, "
                       "the same with 8-bit latents, and (with --teacher) the latent MSE against the "
                       "teacher, in the layout of the SD-VAE model card. Writes eval.csv, eval.json "
                       "and grid.png (columns: image, teacher, each variant) to -o. LPIPS is not "
                       "computed (its weights are not available offline).")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--variant", "-v", action="append", required=True, metavar="NAME[=WEIGHTS]",
                   help="variant to measure, optionally with its weight file/folder (repeatable; "
                        f"names: {', '.join(VARIANTS)})")
    p.add_argument("--weights", "-w", help="weight folder for variants given without =WEIGHTS "
                                           "(default: $TAESD_WEIGHTS, then the hub)")
    p.add_argument("--teacher", help="teacher: a TAESD variant name or a local diffusers autoencoder folder")
    p.add_argument("--scale", type=float, help="teacher latent scale: taesd = (raw - shift) * scale")
    p.add_argument("--shift", type=float, help="teacher latent shift")
    p.add_argument("--family", choices=list(VARIANTS), help="take the teacher's scale/shift from this variant")
    p.add_argument("-o", "--output", help="folder for eval.csv, eval.json and grid.png")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(run=run)


def run(args) -> int:
    from taesd.evaluation.evaluate import evaluate_images, format_table, summarize, write_results
    from taesd.loader import load
    from taesd.training.teachers import load_teacher
    files = expand_inputs(args.inputs, IMAGE_SUFFIXES, "image")
    models = {}
    for spec in args.variant:
        name, _, weights = spec.partition("=")
        models[spec] = load(name, weights=weights or args.weights, device=args.device)
    teacher = None
    if args.teacher:
        teacher = load_teacher(args.teacher, args.weights, args.scale, args.shift, args.family, device=args.device)
    rows, grid = evaluate_images(files, models, teacher, progress=lambda xs: progress(xs, "eval"))
    summary = summarize(rows)
    print(f"{len(files)} images")
    print(format_table(summary))
    if args.output:
        for path in write_results(rows, summary, grid, args.output):
            print(f"wrote {path}")
    return 0
