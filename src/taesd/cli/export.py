"""taesd export onnx: a variant's encoder/decoder as ONNX files for other runtimes."""
from __future__ import annotations

from pathlib import Path

from taesd.cli.common import (
    add_model_options,
    add_output_options,
    command_parser,
    plan_outputs,
    progress,
    weight_files,
)
from taesd.io.files import deferred_renames
from taesd.io.inputs import InputFile
from taesd.registry import VIDEO_VARIANTS, get_variant


def add_parser(sub):
    p = command_parser(sub, "export", "export a variant to another format (ONNX)",
                       "taesd export onnx --variant taef2 -o onnx/")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    from taesd.export.onnx import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
    o = command_parser(formats, "onnx", "export to ONNX (dynamic batch, height and width)",
                       "taesd export onnx --variant taef2 --part decoder --fp16 -o onnx/",
                       "Write <variant>_encoder.onnx / <variant>_decoder.onnx (.fp16.onnx with --fp16). "
                       "Inputs/outputs are named 'image' (N x 3|4 x H x W, values in [0, 1]) and 'latent' "
                       "(TAESD's latent convention); the decoder's output is not clamped. Metadata "
                       "(taesd.variant, taesd.part, taesd.vae_scale, ...) is stored in the file: "
                       "`taesd info FILE.onnx` shows it with the operator set. See docs/onnx.md.")
    add_model_options(o, running=False, video=True)
    o.add_argument("--part", choices=["encoder", "decoder", "both"], default="both",
                   help="what to export (default: both)")
    o.add_argument("--fp16", action="store_true", help="float16 weights, activations, input and output")
    o.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX operator set version, {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    o.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    add_output_options(o, skip_existing=False, fail_fast=False)
    o.set_defaults(run=run)


def run(args) -> int:
    from taesd.export.onnx import allowed_ops, check_opset, onnx_filename, op_counts, save_onnx, to_onnx
    from taesd.loader import load
    check_opset(args.opset)  # before the slow part
    if args.variant in VIDEO_VARIANTS:
        return run_video(args)
    parts = ("encoder", "decoder") if args.part == "both" else (args.part,)
    variant = get_variant(args.variant)
    targets = [Path(args.output) / onnx_filename(variant, part, args.fp16) for part in parts]
    plan_outputs(args, [(InputFile(Path(args.output)), targets)], protected=weight_files(args))
    weights = args.weights[0] if args.weights and len(args.weights) == 1 else args.weights
    model = load(args.variant, weights, device="cpu", dtype="fp32", parts=parts, revision=args.revision,
                 source=args.source)
    lines = []
    with deferred_renames():   # both files appear together, or neither
        for part, dst in zip(progress(list(parts), "export"), targets):
            proto = to_onnx(model, part, fp16=args.fp16, opset=args.opset)
            save_onnx(proto, dst)
            counts = op_counts(proto)
            extra = sorted(set(counts) - allowed_ops(model.variant, part))
            lines.append(f"{dst}  ({proto.ByteSize() / 1e6:.1f} MB, opset {args.opset})")
            lines.append(f"  ops: {', '.join(f'{op} x{n}' for op, n in sorted(counts.items()))}"
                         + (f"  (unexpected: {', '.join(extra)})" if extra else ""))
    print("\n".join(lines))
    return 0


def run_video(args) -> int:
    """A TAEHV variant: each part as one step with its temporal state as inputs/outputs
    (``taesd.export.onnx_video``), named <variant>_<part>_step.onnx."""
    from taesd.errors import TaesdError
    from taesd.export.onnx import save_onnx
    from taesd.export.onnx_video import video_step_to_onnx
    from taesd.video import load_taehv
    if args.fp16:
        raise TaesdError("TAEHV step graphs export in fp32 only; drop --fp16")
    if not args.weights or len(args.weights) != 1:
        raise TaesdError("pass the TAEHV weight file with --weights (one file holds both parts)")
    parts = ("encoder", "decoder") if args.part == "both" else (args.part,)
    targets = [Path(args.output) / f"{args.variant}_{part}_step.onnx" for part in parts]
    plan_outputs(args, [(InputFile(Path(args.output)), targets)], protected=weight_files(args))
    model = load_taehv(args.weights[0], variant=args.variant)
    with deferred_renames():
        for part, dst in zip(parts, targets):
            proto = video_step_to_onnx(model, part, opset=args.opset)
            save_onnx(proto, dst)
            print(f"{dst}  ({proto.ByteSize() / 1e6:.1f} MB, opset {args.opset}); inputs "
                  f"{', '.join(i.name for i in proto.graph.input)}")
    return 0
