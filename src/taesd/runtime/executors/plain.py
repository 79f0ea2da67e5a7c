"""The plain executor ("plain"): the published modules as they are (eager PyTorch, any device)."""
from __future__ import annotations

import dataclasses

from taesd.runtime.executors.base import Executor


@dataclasses.dataclass(frozen=True)
class PlainExecutor(Executor):
    """Nothing to transform: ``apply`` only undoes another executor and records itself."""

    name = "plain"
