"""Stopping a run cleanly: Ctrl-C (SIGINT) or SIGTERM (``kill``, ``timeout``, systemd, ``docker stop``)
asks the loop to stop after the current step; the loop then writes a checkpoint and returns."""
from __future__ import annotations

import contextlib
import signal


class StopFlag:
    """``with StopFlag() as flag:`` ... ``flag.stop`` turns True on SIGINT/SIGTERM; the previous
    handlers come back on exit. (Only the main thread may set handlers; elsewhere it never fires.)"""

    def __init__(self):
        self.stop = False
        self.old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.stop = True

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)
