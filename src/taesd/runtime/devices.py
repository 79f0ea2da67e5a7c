"""Refusing a device this machine lacks, in one line, before any weight is read (``taesd.load``, the
CLI's ``--device``, ``taesd eval``): torch's own errors for these are AssertionErrors from deep inside."""
from __future__ import annotations

import torch

from taesd.errors import TaesdError


def check_device(name: "str | torch.device | None", option: str = "device") -> None:
    """Raise ``TaesdError`` unless ``name`` (None: the default device) is usable here. ``option`` is how
    the caller spells the setting in messages: ``"device"`` (Python: ``device='cuda'``) or ``"--device"``."""
    if name is None:
        return

    def spell(value) -> str:
        return f"{option} {value}" if option.startswith("--") else f"{option}={str(value)!r}"

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as e:
        raise TaesdError(f"unknown device {str(name)!r}; use cpu, cuda, cuda:N or mps") from e
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise TaesdError(f"{spell(name)}: {why}; use {spell('cpu')}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TaesdError(f"{spell(name)}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise TaesdError(f"{spell(name)}: MPS is not available on this machine; use {spell('cpu')}")
        return
    raise TaesdError(f"{spell(name)}: unsupported device type {dev.type!r}; use cpu, cuda or mps")
