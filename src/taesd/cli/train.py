"""taesd train: distil a tiny autoencoder from a teacher VAE (one CPU process or accelerate launch).

The options are TrainConfig's fields, built from their declarations: the type gives the argument's
kind (a bool is a switch, a list takes one or more values, a tuple a fixed count), the metadata its
help, --help section, choices and metavar; a field without a default is required. The values are
checked once, by TrainConfig itself.
"""
from __future__ import annotations

import argparse
import json
import os
import typing
from dataclasses import MISSING, Field, fields

import torch

from taesd.cli.common import command_parser
from taesd.errors import TaesdError
from taesd.training.config import TrainConfig, config_from_dict, flag
from taesd.training.loop import train

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class Switch(argparse.Action):
    """A bool option: ``--x`` or ``--x 1`` turns it on, ``--x 0`` off."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs="?", metavar="1|0", **kw)

    def __call__(self, parser, namespace, value, option_string=None):
        if value is not None and value.lower() not in TRUE + FALSE:
            raise argparse.ArgumentError(self, f"expected 1 or 0, not {value!r}")
        setattr(namespace, self.dest, value is None or value.lower() in TRUE)


def argument(f: Field, kind) -> dict:
    """add_argument's keywords for one TrainConfig field of (resolved) type ``kind``."""
    meta = f.metadata
    required = f.default is MISSING and f.default_factory is MISSING
    default = None if required else f.default if f.default_factory is MISSING else f.default_factory()
    args = typing.get_args(kind)
    if type(None) in args:  # "X | None": an optional X
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    help = meta["help"].replace("%", "%%")  # argparse formats help strings with %
    if not (default is None or default is False or default in ("", [])):
        help += f" (default: {' '.join(map(str, default)) if isinstance(default, tuple) else default})"
    spec = {"help": help, "default": default, "required": required}
    if "metavar" in meta:
        spec["metavar"] = meta["metavar"]
    if kind is bool:
        return {**spec, "action": Switch}
    origin = typing.get_origin(kind)
    if origin is list:
        return {**spec, "nargs": "+", "type": args[0], "choices": meta.get("choices")}
    if origin is tuple:
        return {**spec, "nargs": len(args), "type": args[0]}
    return {**spec, "type": kind, "choices": meta.get("choices")}


def add_parser(sub):
    p = command_parser(
        sub, "train", "distil a tiny autoencoder from a teacher VAE",
        "taesd train --data photos/ --teacher taef2 --student custom --width 32 --steps 2000 --out runs/t",
        "Train a TAESD-style student on a folder of images: the encoder learns the teacher's latents "
        "(MSE), the decoder turns the teacher's latents back into images (MSE/L1 + latent-conditioned "
        "adversarial). Runs on one CPU process as is, or on many GPUs with `accelerate launch -m taesd "
        "train ...`. Ctrl-C or SIGTERM saves a checkpoint; --resume continues bit-exactly. See "
        "docs/training.md.")
    kinds = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        group = f.metadata.get("group")
        if group is None:
            continue  # not a command-line option
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        groups[group].add_argument(flag(f.name), dest=f.name, **argument(f, kinds[f.name]))
    p.set_defaults(run=run)


def run(args) -> int:
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.metadata.get("group")}
    try:
        report = train(config_from_dict(given))
    except (MemoryError, torch.OutOfMemoryError) as e:
        raise TaesdError(f"out of memory while training; lower --batch or --crop (--grad-accum keeps the "
                         f"effective batch); --resume continues from {args.out}'s last checkpoint") from e
    if report.get("stopped_early"):
        print(f"stopped at step {report['step']}; checkpoint in {args.out}; continue with --resume")
        return 130
    if int(os.environ.get("RANK", "0")) == 0:  # one report, not one per process
        print(json.dumps({k: v for k, v in report.items() if k not in ("replica_digests",)}, indent=2))
    return 0

