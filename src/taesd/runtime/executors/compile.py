"""The compile executor ("compile"): ``torch.compile`` each part in place; inductor fuses by itself,
so it gets the plain modules (channels_last). The modules keep their class, indices and state_dict.
The first call per input shape compiles (tens of seconds on a CPU)."""
from __future__ import annotations

import dataclasses

import torch

from taesd.runtime.executors.base import Executor


@dataclasses.dataclass(frozen=True)
class CompileExecutor(Executor):
    """``torch.compile(mode=mode, dynamic=False)`` per part (``mode`` None: torch's default)."""

    name = "compile"
    mode: "str | None" = None

    def transform(self, model) -> None:
        for part in model.parts:
            module = model.part(part)
            module.to(memory_format=torch.channels_last)
            module.compile(dynamic=False, mode=self.mode)

    def restore(self, model) -> None:
        for part in model.parts:
            module = model.part(part)
            module._compiled_call_impl = None   # what nn.Module.compile set
            module.to(memory_format=torch.contiguous_format)


def compile_model(model):
    """``CompileExecutor().apply(model)``."""
    return CompileExecutor().apply(model)
