"""taesd convert: weights between the pth, safetensors, diffusers and comfyui formats."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

from taesd.cli.common import add_output_options, command_parser
from taesd.errors import TaesdError
from taesd.io.files import deferred_renames
from taesd.io.weights.identify import identify_variant
from taesd.io.weights.layouts import FORMATS
from taesd.io.weights.resolve import resolve
from taesd.io.weights.source import read_source
from taesd.io.weights.write import cast_parts, save_weights
from taesd.registry import PARTS, VARIANTS, get_variant
from taesd.runtime.dtypes import DTYPE_CHOICES, resolve_dtype


def add_parser(sub):
    p = command_parser(sub, "convert", "convert weights between formats",
                       "taesd convert taef2_encoder.pth taef2_decoder.pth --to comfyui -o taef2.safetensors",
                       "Convert TAESD weights between formats: pth (original), safetensors (one file "
                       "per part), diffusers (AutoencoderTiny folder; base variants only) and comfyui "
                       "(one combined file as ComfyUI loads it; taef2: per-part files; taesana is refused, "
                       "ComfyUI has no Sana network). Sources are files/folders, or a variant name to "
                       "convert "
                       "the weights found in $TAESD_WEIGHTS. Tensors are copied bit-exactly unless "
                       "--dtype is given (a tensor that would overflow or vanish in it is refused). "
                       "Nothing is "
                       "written when a target is one of the files read, or "
                       "exists (unless --overwrite).")
    p.add_argument("sources", nargs="+", help="weight files/folders, or a variant name")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("-o", "--output", required=True,
                   help="output folder (pth, safetensors, diffusers) or .safetensors file (comfyui)")
    p.add_argument("--variant", "-v", choices=list(VARIANTS), metavar="NAME",
                   help="variant, when the tensors fit several (taesd/taesdxl, taesd3/taef1)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="cast the tensors (default: keep)")
    add_output_options(p, skip_existing=False, fail_fast=False)
    p.set_defaults(run=run)


def _variant_sources(name: str, names: list[str]) -> dict:
    """The parts of variant ``name`` that resolve (given weights aside): $TAESD_WEIGHTS, the cache,
    a download; a part that does not is left out, and nothing at all is an error naming why."""
    parts, errors = {}, []
    for part in PARTS:
        try:
            src = resolve(name, None, part)[part]
        except TaesdError as e:
            errors.append(str(e))
            continue
        parts[part] = src.parts[part]
        names.append(str(src.path))
    if not parts:
        raise TaesdError(errors[0])
    return parts


def run(args) -> int:
    parts, extras, names = {}, {}, []
    for s in args.sources:
        if s in VARIANTS and not Path(s).exists():
            args.variant = args.variant or s
            parts.update(_variant_sources(s, names))
            continue
        src = read_source(s)
        for part, sd in src.parts.items():
            if part in parts:
                raise TaesdError(f"two sources hold a {part}; pass one encoder and one decoder")
            parts[part] = sd
        extras.update(src.extras)
        names.append(str(s))
    variant = get_variant(identify_variant(parts, names, args.variant))
    if args.to == "comfyui":
        from taesd.io.weights.comfyui import check_target
        check_target(variant)
    if args.dtype:
        parts = cast_parts(parts, resolve_dtype(args.dtype))
    check = _target_check([Path(n) for n in names], args.overwrite)
    made = _missing_folders(Path(args.output))
    try:
        with deferred_renames(check), warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always", UserWarning)
            written = save_weights(parts, variant, args.to, args.output, extras or None)
    except BaseException:
        for folder in made:   # leave no empty folder behind a refused conversion
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    for note in notes:   # a library note becomes one plain line, not a warning with its source line
        print(f"note: {note.message}", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    return 0


def _missing_folders(out: Path) -> list[Path]:
    """``out`` and its parents that do not exist yet, deepest first."""
    return [p for p in [out, *out.parents] if not p.exists()]


def _target_check(sources: list[Path], overwrite: bool):
    """Refuse targets that are files being read (a source file, or one inside a source folder) and,
    without --overwrite, existing files."""
    read = set()
    for s in sources:
        files = [f for f in s.rglob("*") if f.is_file()] if s.is_dir() else [s]
        read.update(os.path.realpath(f) for f in files)

    def check(targets: list[Path]) -> None:
        for t in targets:
            if os.path.realpath(t) in read:
                raise TaesdError(f"{t} is one of the files being converted; choose another -o "
                                 f"(nothing was written)")
        existing = [t for t in targets if t.exists()]
        if existing and not overwrite:
            raise TaesdError(f"{existing[0]} exists; pass --overwrite to replace it (nothing was written)")
    return check
