"""taesd info: the variants table, or what a weight file holds."""
from __future__ import annotations

from pathlib import Path

from taesd.registry import list_variants
from taesd.cli.common import command_parser


def add_parser(sub):
    p = command_parser(sub, "info", "list the variants, or show what a weight file holds",
                       "taesd info ../shared/weights/taef2_decoder.pth",
                       "Without arguments: the table of TAESD variants. With files: the format, parts, "
                       "matching variants, dtype, parameter count and sha256 of each; for .onnx exports: "
                       "inputs, outputs, metadata and the operator set with counts.")
    p.add_argument("files", nargs="*", help="weight files, diffusers folders or exported .onnx files")
    p.add_argument("--variant", "-v", metavar="NAME",
                   help="show which weight files this variant resolves to ($TAESD_WEIGHTS, then the hub)")
    p.add_argument("--revision", help="hub revision to resolve with --variant")
    p.set_defaults(run=run)


def variants_table() -> str:
    rows = [("name", "family", "latent ch", "image ch", "downscale", "arch", "hub")]
    for v in list_variants():
        rows.append((v.name, v.family, str(v.latent_channels), str(v.image_channels), f"{v.downscale}x",
                     v.arch, next((s.repo for s in v.sources if s.host == "hub"), "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_file(path: Path) -> str:
    from taesd.io.weights.formats import read_source
    from taesd.io.weights.identify import describe
    src = read_source(path)
    lines = [f"{path}", f"  format: {src.format}", f"  sha256: {src.sha256}"]
    for part, sd in src.parts.items():
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in sd.values()})
        n = sum(t.numel() for t in sd.values())
        lines.append(f"  {part}: {describe(sd, part)}, {n:,} parameters, {'/'.join(dtypes)}")
    for k, val in src.extras.items():
        lines.append(f"  {k}: {val:g}")
    return "\n".join(lines)


def resolved(variant: str, revision: str | None) -> str:
    """Which file each part of ``variant`` resolves to, with its sha256."""
    from taesd.errors import TaesdError
    from taesd.io.weights.resolve import find_weights
    from taesd.registry import PARTS
    lines = [f"{variant}:"]
    for part in PARTS:
        try:
            path = find_weights(variant, part, revision=revision)
        except TaesdError as e:
            lines.append(f"  {part}: not found ({e})")
            continue
        lines.append(f"  {part} <- " + describe_file(path).replace("\n", "\n  "))
    return "\n".join(lines)


def run(args) -> int:
    if args.variant:
        print(resolved(args.variant, args.revision))
        return 0
    if not args.files:
        print(variants_table())
        return 0
    for f in map(Path, args.files):
        if f.suffix == ".onnx":
            from taesd.export.onnx import describe_onnx
            print(describe_onnx(f))
        else:
            print(describe_file(f))
    return 0
