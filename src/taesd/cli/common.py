"""What several commands share: model options, opening the model, output paths, progress."""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from taesd.registry import VARIANTS
from taesd.runtime.dtypes import DTYPE_CHOICES


def command_parser(sub, name: str, help: str, example: str, description: str = "") -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description or help,
                       epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
    return p


def add_model_options(p: argparse.ArgumentParser, variant_required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--variant", "-v", required=variant_required, choices=list(VARIANTS), metavar="NAME",
                   help=f"TAESD variant: {', '.join(VARIANTS)}")
    g.add_argument("--weights", "-w", action="append", metavar="PATH",
                   help="weight file or folder (repeatable; default: $TAESD_WEIGHTS, the cache, a download)")
    g.add_argument("--source", choices=["hub", "github"],
                   help="download only from there (default: the registry's order, hub first)")
    g.add_argument("--revision", help="revision to pin when downloading (hub commit; GitHub commit with "
                   "--source github)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", default="fp32", choices=DTYPE_CHOICES, help="compute precision")
    g.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"],
                   help="inference engine (onnxruntime: --weights may be exported .onnx files)")


def add_tiling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tiling (seam-exact: same result as untiled, bounded memory)")
    g.add_argument("--tile-size", type=int, metavar="N",
                   help="tile side in latent pixels (e.g. 64); default: only when needed")
    g.add_argument("--max-memory", metavar="SIZE",
                   help="memory budget for activations, e.g. 1GiB or 512MiB (picks the tile size)")


def tiling_kwargs(args) -> dict:
    """The tiling keyword arguments of ``encode``/``decode`` from the parsed options."""
    return {"tile_size": args.tile_size, "max_memory": args.max_memory}


def open_model(args, parts):
    from taesd.loader import load
    weights = args.weights
    if weights is not None and len(weights) == 1:
        weights = weights[0]
    return load(args.variant, weights=weights, device=args.device, dtype=args.dtype, parts=parts,
                revision=args.revision, backend=args.backend, source=getattr(args, "source", None))


def output_path(out: "str | None", src: Path, suffix: str, single: bool) -> Path:
    """``-o`` as a file when one input is given and it has a suffix, else as a folder."""
    name = src.name.split(".")[0] + suffix
    if out is None:
        return src.parent / name
    o = Path(out)
    if single and o.suffix and not o.is_dir():
        return o
    return o / name


def progress(items, desc: str):
    return tqdm(items, desc=desc, unit="file", disable=len(items) < 2, dynamic_ncols=True)
