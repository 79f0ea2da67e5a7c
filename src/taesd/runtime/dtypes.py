"""Precision: the names the user may type (fp32, fp16, bf16 and their long forms) and the one rule
for the dtype a model runs in when none is given (``default_dtype``), which every entry point uses:
``taesd.load``, ``TaesdVAE``, ``use_taesd_vae``, previews, the CLI, ``taesd eval`` and the benchmarks."""
from __future__ import annotations

import torch

from taesd.errors import TaesdError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("fp32", "fp16", "bf16")   # what the command line offers
TENSOR_CORE_CAPABILITY = (7, 0)  # Volta: the first GPUs with fp16 tensor cores


def resolve_dtype(dtype) -> torch.dtype:
    """None -> float32; a torch dtype as it is; a name from ``DTYPES``."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise TaesdError(f"unknown dtype {dtype!r}; use {', '.join(DTYPE_CHOICES)}")
    return DTYPES[str(dtype).lower()]


def default_dtype(device, dtype=None, capability: "tuple[int, int] | None" = None) -> torch.dtype:
    """The dtype a model on ``device`` runs in: ``dtype`` when given (a name or torch dtype), else
    fp16 on a CUDA device with tensor cores (``capability`` >= 7.0, read from the device unless given),
    else fp32."""
    if dtype is not None:
        return resolve_dtype(dtype)
    device = torch.device("cpu" if device is None else device)
    if device.type != "cuda":
        return torch.float32
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    return torch.float16 if tuple(capability) >= TENSOR_CORE_CAPABILITY else torch.float32
