"""Value checks of the inputs (NaN/Inf latents or images, images far outside [0, 1]) without a host
sync on a GPU.

On the CPU a check reads its verdict at once (reading a CPU tensor costs no round trip). On a CUDA
device reading it back would block the host until the GPU has caught up, on every call (~1 ms of a
1-2 ms decode, measured). So there the check is queued on the device instead: one ``aminmax``, its
two numbers copied without blocking into pinned host memory, and an event recorded after them. The
verdict is read only once the event has completed, which costs nothing:

- at the start of the next checked call (any model, ``encode`` or ``decode``), for every earlier
  check whose event is done (``raise_ready``); never waiting;
- by ``raise_pending()`` (``taesd.raise_input_errors``), which waits: call it after your own sync
  (``.cpu()``, saving an image) when you want the error of this very call;
- at most ``MAX_PENDING`` checks wait; beyond that the oldest is waited for (the host is then
  that many calls ahead of the GPU, which is GPU-bound anyway).

A failure is the same one-line ``TaesdError`` as on the CPU, naming the call's input ("the latents of
an earlier call ..."). The input is kept until its verdict is read, so the error can count and
locate the bad values.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from taesd.errors import TaesdError

# Images are in [0, 1]; a little outside is rounding or a filter's overshoot, far outside a mistake.
IMAGE_SLACK = 0.5
MAX_PENDING = 32
# Device types whose checks are queued, with the event type that tells when a verdict is readable.
# Tests put a fake event under "cpu" to run the queued path on a CPU.
DEFERRED: "dict[str, Callable]" = {"cuda": lambda: torch.cuda.Event()}


@dataclass
class _Pending:
    stats: torch.Tensor   # [min, max] in host memory, filled by the device when ``done`` completes
    done: object          # an event: query() -> bool, synchronize()
    x: torch.Tensor       # the input, for the error's count and place
    what: str


_pending: "deque[_Pending]" = deque()
_lock = threading.Lock()


def check_values(x: torch.Tensor, what: str) -> None:
    """Check ``x`` ("images" or "latents"): raise now, or queue the check on its device (above)."""
    raise_ready()
    event_type = DEFERRED.get(x.device.type)
    if event_type is None:
        lo, hi = (float(t) for t in torch.aminmax(x))
        judge(lo, hi, x, what)
        return
    stats = torch.stack(torch.aminmax(x)).float()
    host = torch.empty(2, dtype=torch.float32, pin_memory=x.is_cuda)
    host.copy_(stats, non_blocking=True)
    done = event_type()
    done.record()
    with _lock:
        _pending.append(_Pending(host, done, x, what))
        full = len(_pending) > MAX_PENDING
    if full:
        _read(wait=True, limit=1)


def raise_ready() -> None:
    """Raise the first failure among the queued checks whose verdict is already readable."""
    _read(wait=False)


def raise_pending() -> None:
    """Wait for every queued check and raise the first failure (a host sync: call it where you sync)."""
    _read(wait=True)


def _read(wait: bool, limit: int | None = None) -> None:
    read = 0
    while limit is None or read < limit:
        with _lock:
            if not _pending or not (wait or _pending[0].done.query()):
                return
            item = _pending.popleft()
        if wait:
            item.done.synchronize()
        read += 1
        lo, hi = item.stats.tolist()   # host memory the device has written: no round trip
        judge(lo, hi, item.x, f"{item.what} of an earlier call")


def judge(lo: float, hi: float, x: torch.Tensor, what: str) -> None:
    """The one-line errors, from the input's min and max (NaN/Inf propagate into them)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        _report_non_finite(x, what)
        raise TaesdError(f"the {what} held NaN or infinite values; fix what produced them")
    if not what.startswith("images"):
        return
    if hi > 1 + IMAGE_SLACK:
        hint = "divide by 255" if hi <= 255 + IMAGE_SLACK else "scale them"
        raise TaesdError(f"image values reach {hi:g}, but images are in [0, 1]; {hint} first")
    if lo < -IMAGE_SLACK:
        raise TaesdError(f"image values go down to {lo:g}, but images are in [0, 1]; "
                         f"for [-1, 1] images use (images + 1) / 2")


def _report_non_finite(x: torch.Tensor, what: str) -> None:
    """Count and locate the bad values (the failure path: syncs are fine here)."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        n = int(bad.sum())
        kind = "NaN" if bool(torch.isnan(x).any()) else "infinite"
        raise TaesdError(f"the {what} hold {n} {kind} value{'s' if n > 1 else ''} (first at index "
                         f"{tuple(int(i) for i in bad.nonzero()[0])}); fix what produced them")
