"""What several commands share: model options, opening the model, planning outputs, running a batch.

Outputs: ``plan_outputs`` applies ``taesd.io.outputs`` (every output checked before any work; existing
ones refused unless --overwrite or --skip-existing) to the command's options.
Batches (``run_batch``): a failing input is reported and the batch goes on; at the end every
failure is printed, one line each (``path: reason``), and the exit code is 2. ``--fail-fast``
stops at the first failure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from taesd.errors import TaesdError
from taesd.io import outputs
from taesd.io.files import output_policy
from taesd.io.inputs import InputFile, collect_inputs
from taesd.options import executor_from_switches
from taesd.registry import VARIANTS, VIDEO_VARIANTS
from taesd.runtime.dtypes import DTYPE_CHOICES
from taesd.runtime.executors import NAMES


def command_parser(sub, name: str, help: str, example: str, description: str = "") -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description or help,
                       epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
    return p


def add_model_options(p: argparse.ArgumentParser, variant_required: bool = True,
                      running: bool = True, video: bool = False) -> None:
    """--variant and where its weights come from; with ``running``, also how it runs (device, dtype,
    executor): commands that only read weights (export) leave those out. With ``video``, --variant
    also takes the TAEHV variants (the command hands those to ``taesd video``)."""
    g = p.add_argument_group("model")
    names = [*VARIANTS, *VIDEO_VARIANTS] if video else list(VARIANTS)
    g.add_argument("--variant", "-v", required=variant_required, choices=names, metavar="NAME",
                   help=f"TAESD variant: {', '.join(VARIANTS)}"
                        + (f"; TAEHV (videos): {', '.join(VIDEO_VARIANTS)}" if video else ""))
    g.add_argument("--weights", "-w", action="append", metavar="PATH",
                   help="weight file or folder (repeatable; default: $TAESD_WEIGHTS, the cache, a download)")
    g.add_argument("--source", choices=["hub", "github"],
                   help="download only from there (default: the registry's order, hub first)")
    g.add_argument("--revision", help="revision to pin when downloading (hub commit; GitHub commit with "
                   "--source github)")
    if not running:
        return
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help="precision (default: fp16 on a tensor-core GPU, else fp32, computed in bf16 on "
                        "AMX and AVX-512-BF16 CPUs; an explicit fp32 computes in fp32)")
    g.add_argument("--executor", default=None, choices=NAMES,
                   help="how the network runs (default fast: cuda on a GPU, cpu elsewhere; onnxruntime: "
                        "--weights may be exported .onnx files)")
    g.add_argument("--backend", choices=["torch", "onnxruntime"], help=argparse.SUPPRESS)  # old --executor


def add_tiling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tiling (seam-exact: same result as untiled, bounded memory)")
    g.add_argument("--tile-size", type=int, metavar="N",
                   help="tile side in latent pixels (e.g. 64); default: only when needed")
    g.add_argument("--max-memory", metavar="SIZE",
                   help="memory budget for activations, e.g. 1GiB or 512MiB (picks the tile size); "
                        "held within 10%% on the CPU executors unless TAESD_MALLOPT=0")


OVERWRITE_HELP = ("replace existing outputs that taesd wrote (they carry its marker; a file of yours with "
                  "an output's name is never replaced); default: refuse before doing anything")


def add_output_options(p: argparse.ArgumentParser, skip_existing: bool = True,
                       fail_fast: bool = True) -> None:
    g = p.add_argument_group("outputs")
    existing = g.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    if skip_existing:
        existing.add_argument("--skip-existing", action="store_true",
                              help="leave existing outputs alone and skip their inputs")
    if fail_fast:
        g.add_argument("--fail-fast", action="store_true",
                       help="stop at the first input that fails (default: go on, report all at the end)")


def tiling_kwargs(args) -> dict:
    """The tiling keyword arguments of ``encode``/``decode`` from the parsed options."""
    return {"tile_size": args.tile_size, "max_memory": args.max_memory}


def check_tiling(args) -> None:
    """Refuse bad tiling options before any work (not once per input): the library's own check."""
    from taesd.tiling import check_options
    check_options(getattr(args, "tile_size", None), getattr(args, "max_memory", None),
                  names=("--tile-size", "--max-memory"))


def check_options(args) -> None:
    """The up-front checks every model command makes: device and tiling options."""
    check_device(getattr(args, "device", None))
    check_tiling(args)


def check_device(name: str | None) -> None:
    """Refuse, before anything is read, a device this machine does not have."""
    from taesd.runtime.devices import check_device as check
    check(name, "--device")


def open_model(args, parts):
    from taesd.loader import load
    check_device(args.device)
    weights = args.weights
    if weights is not None and len(weights) == 1:
        weights = weights[0]
    executor = executor_from_switches(args.executor, backend=args.backend)
    return load(args.variant, weights=weights, device=args.device, dtype=args.dtype, parts=parts,
                revision=args.revision, executor=executor, source=getattr(args, "source", None))


def gather_inputs(args, suffixes: tuple[str, ...], what: str) -> list[InputFile]:
    files, skipped = collect_inputs(args.inputs, suffixes, what)
    if skipped:
        note(args, f"skipped {len(skipped)} file(s) that taesd wrote (e.g. {skipped[0]}); "
                   f"name them directly to take them as inputs")
    return files


def plan_outputs(args, jobs: "Sequence[tuple[InputFile, list[Path]]]", protected: Sequence[Path] = ()
                 ) -> list[tuple[InputFile, list[Path]]]:
    """``taesd.io.outputs.plan_outputs`` with this command's --overwrite / --skip-existing."""
    return outputs.plan_outputs(jobs, protected, overwrite=getattr(args, "overwrite", False),
                                skip_existing=getattr(args, "skip_existing", None),
                                note=lambda text: note(args, text))


def describe_failure(path: Path, e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return msg if str(path) in msg else f"{path}: {msg}"


def run_batch(args, jobs: list, work: Callable, desc: str) -> int:
    """Run ``work(job)`` for each job (``job[0]`` an InputFile) under the no-clobber rule of
    ``--overwrite`` (held again as each file is written); failing jobs are collected and reported at
    the end, one line each; returns the exit code (2 if any failed)."""
    failures: list[str] = []
    with output_policy(getattr(args, "overwrite", False)):
        for job in progress(jobs, desc):
            try:
                work(job)
            except (TaesdError, MemoryError, torch.OutOfMemoryError) as e:
                if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
                    e = TaesdError("out of memory; try --max-memory or --tile-size")
                if getattr(args, "fail_fast", False):
                    raise TaesdError(describe_failure(job[0].path, e)) from e
                failures.append(describe_failure(job[0].path, e))
    return report_failures(args, failures, len(jobs), "the others were done") if failures else 0


def report_failures(args, failures: list[str], total: int, rest: str) -> int:
    """Print each failure on one line (and, for batches, how many failed); returns exit code 2."""
    for line in failures:
        print(f"taesd {args.command}: error: {line}", file=sys.stderr)
    if total > 1:
        print(f"taesd {args.command}: {len(failures)} of {total} inputs failed; {rest}", file=sys.stderr)
    return 2


def note(args, text: str) -> None:
    tqdm.write(f"taesd {args.command}: note: {text}", file=sys.stderr)


def say(text: str) -> None:
    """A result line on stdout, above a progress bar if one is drawn (never onto it)."""
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def progress(items, desc: str):
    """A progress bar on a terminal (none when stderr is a file or a pipe: logs stay readable)."""
    return tqdm(items, desc=desc, unit="file", dynamic_ncols=True,
                disable=len(items) < 2 or not sys.stderr.isatty())


def weight_files(args) -> list[Path]:
    """The weight files named with --weights: no output may land on them."""
    w = getattr(args, "weights", None) or []
    return [Path(p) for p in ([w] if isinstance(w, str) else w)]
