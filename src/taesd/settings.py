"""Every ``TAESD_*`` environment variable, in one place, read at call time (never at import).

Each accessor returns a typed value or raises ``TaesdError`` naming the variable and what it takes.
One boolean rule (``1/true/yes/on`` and ``0/false/no/off``, case-insensitive) and one cache-folder
rule (``$TAESD_CACHE_DIR``, else ``$XDG_CACHE_HOME/taesd``, else ``~/.cache/taesd``) for the package.
"""
from __future__ import annotations

import os
from pathlib import Path

from taesd.errors import TaesdError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

# name -> what it does; `taesd info --settings`-style listings and the README read this table.
VARIABLES = {
    "TAESD_WEIGHTS": "a folder (or file) of weights searched before the cache and the network",
    "TAESD_CACHE_DIR": "where downloads and the compiled CPU kernels are kept",
    "TAESD_OFFLINE": "1: never reach the network (HF_HUB_OFFLINE=1 does the same)",
    "TAESD_GITHUB_URL": "another host for the GitHub-published weights (a mirror, a test server)",
    "TAESD_MAX_IMAGE_PIXELS": "the largest image, in pixels, an input may decode to",
    "TAESD_CGROUP_DIR": "the cgroup folder whose memory limit bounds automatic tiling",
    "TAESD_WINOGRAD": "0: the CPU executor uses oneDNN's direct convolutions only",
    "TAESD_AMX": "0: bf16 compute on AMX CPUs uses oneDNN's convolutions only, not taesd's AMX kernel",
    "TAESD_CPU_BF16": "0: fp32 models compute in fp32 on every CPU; 1: in bf16 wherever it runs natively; "
                      "unset: bf16 where the CPU has AMX or AVX-512-BF16",
    "TAESD_ISA": "avx2, avx512 or avx512_bf16: taesd's CPU choices and kernels act as on a CPU of at most "
                 "that tier (to test or compare an older CPU's paths on a newer one)",
    "TAESD_MALLOPT": "0: the CPU executor leaves glibc's allocator thresholds alone",
    "TAESD_PER_IMAGE_BYTES": "the CPU executor's per-image split threshold, in bytes",
    "TAESD_TILE_OVERHEAD": "the tiling planner's memory factor for the Winograd kernel",
    "TAESD_TILE_OVERHEAD_DIRECT": "the tiling planner's memory factor for direct convolutions",
    "TAESD_CUDA_GRAPHS": "0: the CUDA executor runs eagerly (no graph capture)",
    "TAESD_CUDNN_BENCHMARK": "0: the CUDA executor leaves torch.backends.cudnn.benchmark alone",
    "TAESD_IMAGE_CACHE": "how many decoded training images stay in memory",
}


def raw(name: str) -> str | None:
    """The variable's text, stripped; None when unset or empty."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a taesd setting")
    value = os.environ.get(name, "").strip()
    return value or None


def flag(name: str, default: bool) -> bool:
    value = raw(name)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise TaesdError(f"{name}={value!r} is not a switch: use 1 or 0")


def number(name: str, default: float, kind: type = int) -> float:
    value = raw(name)
    if value is None:
        return default
    try:
        result = kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise TaesdError(f"{name}={value!r} must be {what}") from None
    if result <= 0:
        raise TaesdError(f"{name}={value!r} must be above 0")
    return result


def path(name: str) -> Path | None:
    value = raw(name)
    return Path(value).expanduser() if value else None


# ---------------------------------------------------------------- the settings, by name

def weights_path() -> Path | None:
    return path("TAESD_WEIGHTS")


def cache_dir() -> Path:
    """The one cache-folder rule."""
    explicit = path("TAESD_CACHE_DIR")
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "taesd"


def offline() -> str | None:
    """The setting that switches downloads off, as the user would write it, or None."""
    if flag("TAESD_OFFLINE", False):
        return "TAESD_OFFLINE=1"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE=1"
    return None


def github_url(default: str) -> str:
    return (raw("TAESD_GITHUB_URL") or default).rstrip("/")


def max_image_pixels() -> int | None:
    value = raw("TAESD_MAX_IMAGE_PIXELS")
    if value is None:
        return None
    if not value.isdigit() or int(value) <= 0:
        raise TaesdError(f"TAESD_MAX_IMAGE_PIXELS must be a whole number of pixels above 0, not {value!r}")
    return int(value)


def cgroup_dir() -> Path | None:
    return path("TAESD_CGROUP_DIR")


def winograd() -> bool:
    return flag("TAESD_WINOGRAD", True)


def amx() -> bool:
    """$TAESD_AMX: our AMX 3x3 kernel for bf16 compute (taesd.runtime.amx); 0 leaves oneDNN's."""
    return flag("TAESD_AMX", True)


def cpu_bf16() -> bool | None:
    """$TAESD_CPU_BF16 as a switch; None when unset (the CPU decides: taesd.runtime.isa)."""
    return None if raw("TAESD_CPU_BF16") is None else flag("TAESD_CPU_BF16", False)


ISA_TIERS = ("avx2", "avx512", "avx512_bf16", "amx")


def isa_cap() -> str | None:
    """$TAESD_ISA: the highest CPU tier taesd uses (taesd.runtime.isa); None when unset."""
    value = raw("TAESD_ISA")
    if value is None:
        return None
    if value.lower() not in ISA_TIERS:
        raise TaesdError(f"TAESD_ISA must be one of {', '.join(ISA_TIERS)}, not {value!r}")
    return value.lower()


def mallopt() -> bool:
    return flag("TAESD_MALLOPT", True)


def per_image_bytes() -> int:
    return int(number("TAESD_PER_IMAGE_BYTES", 16 << 20))


def tile_overhead(direct: bool) -> float:
    if direct:
        return float(number("TAESD_TILE_OVERHEAD_DIRECT", 1.2, float))
    return float(number("TAESD_TILE_OVERHEAD", 1.15, float))


def cuda_graphs() -> bool:
    return flag("TAESD_CUDA_GRAPHS", True)


def cudnn_benchmark() -> bool:
    return flag("TAESD_CUDNN_BENCHMARK", True)


def image_cache() -> int:
    return int(number("TAESD_IMAGE_CACHE", 64))


# ---------------------------------------------------------------- byte sizes (--max-memory, max_memory=)

SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
              "t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: "int | float | str") -> int:
    """``1073741824``, ``"1GiB"``, ``"512 MB"``, ``"1.5g"`` -> bytes (k/M/G are 1000-based,
    KiB/MiB/GiB 1024)."""
    import re
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise TaesdError(f"memory budget must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = m.group(2).lower() if m else None
    if not m or unit not in SIZE_UNITS or float(m.group(1)) <= 0:
        raise TaesdError(f"cannot read memory size {value!r}; write e.g. 1GiB, 512MiB, 2GB or a byte count")
    return int(float(m.group(1)) * SIZE_UNITS[unit])
