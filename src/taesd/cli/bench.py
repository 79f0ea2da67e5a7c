"""taesd bench: runs the speed benchmark of a source checkout (benchmarks/bench_speed.py).

The harness is a tool, not library code: it lives in benchmarks/ and this command only starts it,
passing every option through.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from taesd.cli.common import command_parser
from taesd.errors import TaesdError

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_speed.py"


def add_parser(sub):
    p = command_parser(sub, "bench", "speed benchmark against diffusers, ONNX Runtime and the full SD VAE",
                       "taesd bench --sizes 512 --batches 1 --calls 5 -o RESULTS.md",
                       "Runs benchmarks/bench_speed.py of the source checkout with the options given "
                       "(every competitor in its own process, alternated; writes a markdown table). "
                       "Its options: taesd bench -- --help")
    p.add_argument("options", nargs=argparse.REMAINDER, help="options of benchmarks/bench_speed.py")
    p.set_defaults(run=run)


def run(args) -> int:
    if not SCRIPT.is_file():
        raise TaesdError("taesd bench runs benchmarks/bench_speed.py of a source checkout, which this "
                         "install lacks; clone the taesd repository and run it there")
    options = args.options[1:] if args.options[:1] == ["--"] else args.options
    return subprocess.call([sys.executable, str(SCRIPT), *options])
