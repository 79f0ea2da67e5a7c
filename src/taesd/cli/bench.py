"""taesd bench: runs the speed benchmark of a source checkout (benchmarks/bench_speed.py).

The harness is a tool, not library code: it lives in benchmarks/ of the checkout, and an installed
taesd without one says so and stops. The report goes where ``-o`` says, by default
``taesd-bench.md`` in the current folder; a file the checkout tracks (benchmarks/RESULTS.md, ...) is
never written, and an existing report only with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from taesd.cli.common import command_parser
from taesd.errors import TaesdError

CHECKOUT = Path(__file__).resolve().parents[3]
SCRIPT = CHECKOUT / "benchmarks" / "bench_speed.py"
DEFAULT_REPORT = "taesd-bench.md"


def add_parser(sub):
    p = command_parser(sub, "bench", "speed benchmark against diffusers, ONNX Runtime and the full SD VAE",
                       "taesd bench --sizes 512 --batches 1 --calls 5 -o bench.md",
                       "Runs benchmarks/bench_speed.py of the source checkout with the options given "
                       "(every competitor in its own process, alternated; writes a markdown table to -o, "
                       f"default ./{DEFAULT_REPORT}). Files the checkout tracks are never written; an "
                       "existing report is replaced only with --overwrite. Its options: "
                       "taesd bench -- --help")
    p.add_argument("options", nargs=argparse.REMAINDER, help="options of benchmarks/bench_speed.py")
    p.set_defaults(run=run)


def report_target(options: list[str]) -> tuple[list[str], Path, bool]:
    """(the options with -o made explicit and --overwrite taken out, the report path, overwrite)."""
    overwrite = "--overwrite" in options
    options = [o for o in options if o != "--overwrite"]
    for i, o in enumerate(options):
        if o in ("-o", "--output") and i + 1 < len(options):
            return options, Path(options[i + 1]), overwrite
        if o.startswith("--output="):
            return options, Path(o.split("=", 1)[1]), overwrite
    return [*options, "-o", DEFAULT_REPORT], Path(DEFAULT_REPORT), overwrite


def is_tracked(path: Path) -> bool:
    """Whether git tracks ``path`` (False where there is no git or no repository)."""
    try:
        r = subprocess.run(["git", "ls-files", "--error-unmatch", path.name], cwd=path.parent.resolve(),
                           capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def run(args) -> int:
    if not SCRIPT.is_file():
        raise TaesdError("taesd bench runs benchmarks/bench_speed.py of a source checkout, which this "
                         "install lacks; clone the taesd repository and run `taesd bench` (or python "
                         "benchmarks/bench_speed.py) there")
    options = args.options[1:] if args.options[:1] == ["--"] else args.options
    if any(o in ("-h", "--help") for o in options):
        return subprocess.call([sys.executable, str(SCRIPT), *options])
    options, report, overwrite = report_target(options)
    if report.parent.exists() and is_tracked(report):
        raise TaesdError(f"{report} is a file the checkout tracks; write the report elsewhere (-o FILE) and "
                         f"copy it over yourself if you mean to")
    if report.exists() and not overwrite:
        raise TaesdError(f"{report} exists; pass --overwrite to replace it or -o to write another file")
    return subprocess.call([sys.executable, str(SCRIPT), *options])
