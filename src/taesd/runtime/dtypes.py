"""Precision names the user may type (fp32, fp16, bf16 and their long forms) -> torch dtypes."""
from __future__ import annotations

import torch

from taesd.errors import TaesdError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("fp32", "fp16", "bf16")   # what the command line offers


def resolve_dtype(dtype) -> torch.dtype:
    """None -> float32; a torch dtype as it is; a name from ``DTYPES``."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise TaesdError(f"unknown dtype {dtype!r}; use {', '.join(DTYPE_CHOICES)}")
    return DTYPES[str(dtype).lower()]
