"""The ``taesd`` command line: one module per command, each with ``add_parser`` and ``run``.

Failures are one line on stderr and exit code 2 (``TaesdError``, and any ``OSError`` from the
environment). Ctrl-C exits 130, SIGTERM 143: while ``main`` runs, SIGTERM raises ``Terminated``
so that every atomic write in progress removes its temporary file on the way out.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading

from taesd.errors import TaesdError
from taesd.extras import missing_extra

# Each name is a module taesd.cli.<name> with add_parser(subparsers) and run(args) -> int.
COMMANDS = ["encode", "decode", "roundtrip", "info", "download", "convert", "export", "bench", "train",
            "eval", "video"]

EXAMPLES = """examples:
  taesd roundtrip photo.jpg --variant taef2             # encode + decode, print PSNR/SSIM
  taesd encode photos/ --variant taesdxl -o latents/    # a folder of images -> latent files
  taesd decode latents/ -o decoded/                     # latent files -> PNG images
  taesd info                                            # the variants table
  taesd info taef2_decoder.pth                          # what a weight file holds
  taesd info --variant taef2                            # its published sources, what is cached
  taesd download taef2                                  # fetch into the cache, verified
  taesd convert taef2 --to safetensors -o weights/      # between weight formats
Weights come from --weights, else the folder in $TAESD_WEIGHTS, else the download cache, else a
verified download (Hugging Face hub, GitHub). Offline: TAESD_WEIGHTS=DIR with the .pth files."""


def build_parser() -> argparse.ArgumentParser:
    from taesd.version import __version__
    parser = argparse.ArgumentParser(
        prog="taesd",
        description="TAESD, the Tiny AutoEncoder for Stable Diffusion (and FLUX, SD3, Sana, ...).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"taesd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that cleanup (``finally``, atomic writes) runs."""


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # a second SIGTERM kills at once
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not hasattr(args, "options"):   # only taesd bench passes options through
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.options = extra + args.options
    try:
        with _sigterm_raises():
            return int(args.run(args) or 0)
    except TaesdError as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"taesd {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:   # the environment (a disk, a permission), not a bug: one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"taesd {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        error = missing_extra(e)
        if error is None:
            raise
        print(f"taesd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"taesd {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"taesd {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
