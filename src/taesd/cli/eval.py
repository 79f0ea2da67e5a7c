"""taesd eval: PSNR/SSIM (exact and 8-bit latents) and latent error of TAESD variants on images."""
from __future__ import annotations

from pathlib import Path

from taesd.cli.common import (
    add_output_options,
    check_device,
    command_parser,
    describe_failure,
    gather_inputs,
    plan_outputs,
    progress,
    report_failures,
)
from taesd.io.inputs import IMAGE_SUFFIXES, InputFile
from taesd.registry import VARIANTS


def add_parser(sub):
    p = command_parser(sub, "eval", "measure TAESD variants (and a teacher VAE) on a folder of images",
                       "taesd eval photos/ --variant taef2 --teacher vae/flux2 --family taef2 -o eval/",
                       "Round-trip every image through each variant; print mean +- std of PSNR, SSIM, "
                       "the same with 8-bit latents, and (with --teacher) the latent MSE against the "
                       "teacher, in the layout of the SD-VAE model card. Writes eval.csv, eval.json "
                       "and grid.png (columns: image, teacher, each variant) to -o. LPIPS is not "
                       "computed (its weights are not available offline). An image that fails is reported at "
                       "the end (exit 2) and left out of the numbers; existing result files are refused "
                       "unless --overwrite.")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--variant", "-v", action="append", required=True, metavar="NAME[=WEIGHTS]",
                   help="variant to measure, optionally with its weight file/folder (repeatable; "
                        f"names: {', '.join(VARIANTS)})")
    p.add_argument("--weights", "-w", help="weight folder for variants given without =WEIGHTS "
                                           "(default: $TAESD_WEIGHTS, then the hub)")
    p.add_argument("--teacher", help="teacher: a TAESD variant name or a local diffusers autoencoder folder")
    p.add_argument("--scale", type=float, help="teacher latent scale: taesd = (raw - shift) * scale")
    p.add_argument("--shift", type=float, help="teacher latent shift")
    p.add_argument("--family", choices=list(VARIANTS),
                   help="take the teacher's scale/shift from this variant")
    p.add_argument("-o", "--output", help="folder for eval.csv, eval.json and grid.png")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    add_output_options(p, skip_existing=False)
    p.set_defaults(run=run)


def run(args) -> int:
    from taesd.evaluation.evaluate import (
        RESULT_FILES,
        evaluate_images,
        format_table,
        summarize,
        write_results,
    )
    from taesd.evaluation.teachers import load_teacher
    from taesd.loader import load
    check_device(args.device)
    files = gather_inputs(args, IMAGE_SUFFIXES, "image")
    if args.output:   # the result files are checked before anything is measured
        targets = [Path(args.output) / name for name in RESULT_FILES]
        plan_outputs(args, [(f, []) for f in files] + [(InputFile(Path(args.output)), targets)])
    models = {}
    for spec in args.variant:
        name, _, weights = spec.partition("=")
        models[spec] = load(name, weights=weights or args.weights, device=args.device)
    teacher = None
    if args.teacher:
        teacher = load_teacher(args.teacher, args.weights, args.scale, args.shift, args.family,
                               device=args.device)
    failures = None if args.fail_fast else []
    rows, grid = evaluate_images([f.path for f in files], models, teacher,
                                 progress=lambda xs: progress(xs, "eval"), failures=failures)
    failures = failures or []
    measured = len(files) - len(failures)
    if measured:
        summary = summarize(rows)
        print(f"{measured} images")
        print(format_table(summary))
        if args.output:
            for path in write_results(rows, summary, grid, args.output):
                print(f"wrote {path}")
    if failures:
        return report_failures(args, [describe_failure(f, msg) for f, msg in failures], len(files),
                               "the numbers above leave them out" if measured else "nothing was measured")
    return 0
