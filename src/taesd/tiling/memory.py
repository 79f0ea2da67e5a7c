"""How many bytes this process may still allocate on the host: the kernel's MemAvailable, capped
by the memory cgroup the process runs in (a container's ``-m``, a systemd unit's MemoryMax).

Contract: ``available_bytes()`` = min(host MemAvailable, cgroup limit - cgroup usage) over the
process's cgroup and every ancestor that has a limit; reclaimable page cache (``inactive_file``) is
not counted as used, as the kernel drops it before killing. cgroup v2 (``memory.max``,
``memory.current``) and v1 (``memory.limit_in_bytes``, ``memory.usage_in_bytes``) are read.
``TAESD_CGROUP_DIR`` names one cgroup folder to read instead of discovering it (tests point it at
a folder of fake files; an operator at a parent cgroup).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from pathlib import Path

from taesd import settings

CGROUP_ENV = "TAESD_CGROUP_DIR"
CGROUP_MOUNT = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit number (or close to it).
V1_UNLIMITED = 1 << 60


def host_available() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _read_int(path: Path) -> "int | None":
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _inactive_file(folder: Path) -> int:
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_headroom(folder: "str | os.PathLike") -> "int | None":
    """limit - usage of one cgroup folder (v2 or v1 files), None when it sets no limit."""
    folder = Path(folder)
    for limit_name, usage_name in (("memory.max", "memory.current"),
                                   ("memory.limit_in_bytes", "memory.usage_in_bytes")):
        limit = _read_int(folder / limit_name)
        if limit is None or limit >= V1_UNLIMITED:
            continue
        usage = _read_int(folder / usage_name) or 0
        return max(0, limit - max(0, usage - _inactive_file(folder)))
    return None


def own_cgroups(proc_cgroup: str = "/proc/self/cgroup", mount: Path = CGROUP_MOUNT) -> list[Path]:
    """The memory cgroup folders of this process, innermost first, then each ancestor."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return []
    found: list[Path] = []
    for line in lines:
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":                        # v2 unified hierarchy
            base = mount
        elif "memory" in controllers.split(","):     # v1 memory controller
            base = mount / "memory"
        else:
            continue
        leaf = base / rel.lstrip("/")
        if not leaf.is_dir():   # in a container the own cgroup is mounted as the root
            leaf = base
        chain = [leaf, *leaf.parents]
        found += [p for p in chain if p == base or base in p.parents]
    return found


def cgroup_available() -> "int | None":
    """The smallest headroom of any limiting cgroup this process is in (None: no limit found)."""
    override = settings.cgroup_dir()
    folders = [override] if override else own_cgroups()
    rooms = [r for r in (cgroup_headroom(f) for f in folders) if r is not None]
    return min(rooms) if rooms else None


def available_bytes() -> int:
    """Bytes this process may still allocate: host MemAvailable, capped by its cgroups."""
    host = host_available()
    room = cgroup_available()
    return host if room is None else min(host, room)


def available_memory(device) -> int:
    """Free bytes for activations: the GPU's free memory, or what this process may still allocate
    on the host (``available_bytes``)."""
    if device.type == "cuda":
        import torch
        return torch.cuda.mem_get_info(device)[0]
    return available_bytes()


# ---------------------------------------------------------------- glibc allocator thresholds

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
# Under a memory budget, blocks from this size on get their own mmap, returned to the kernel when
# freed: a heap that keeps freed activations for reuse fragments (tiles of a new size do not fit
# the holes) and held ~45% more than was live at once (docs/tiling.md).
BUDGET_MMAP_THRESHOLD = 4 << 20
# Where glibc's dynamic mmap threshold ends up once a process has freed a few large blocks (its
# DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): restored after a budgeted run in a process nobody tuned.
GLIBC_DYNAMIC_MAX = 32 << 20

_lock = threading.Lock()
_tuned: "dict[int, int]" = {}     # the process's tuned settings (param -> value); empty: glibc's own
_budget_users = 0


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):   # not glibc (musl, ...)
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def set_allocator(values: "dict[int, int]") -> bool:
    """Apply mallopt settings for the whole process and remember them; False where not glibc."""
    fn = _mallopt()
    if fn is None:
        return False
    with _lock:
        ok = all(fn(param, value) == 1 for param, value in values.items())
        if ok:
            _tuned.update(values)
    return ok


@contextlib.contextmanager
def budgeted_allocations():
    """While inside (any thread): big blocks are mmapped and unmapped on free, so the process's
    resident memory follows what is live (measured: glibc's heap otherwise keeps freed activations,
    fragmented, 25-85% above the budget). A no-op with ``TAESD_MALLOPT=0``."""
    global _budget_users
    fn = _mallopt() if settings.mallopt() else None
    if fn is None:
        yield
        return
    with _lock:
        _budget_users += 1
        if _budget_users == 1:
            fn(M_MMAP_THRESHOLD, BUDGET_MMAP_THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _budget_users -= 1
            if _budget_users == 0:
                fn(M_MMAP_THRESHOLD, _tuned.get(M_MMAP_THRESHOLD, GLIBC_DYNAMIC_MAX))
