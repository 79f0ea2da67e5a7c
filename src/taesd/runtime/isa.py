"""What this x86 CPU can do, read once from /proc/cpuinfo, and the CPU policy chosen from it.

The fast CPU executor asks two things: which precision runs fastest while holding 40 dB against fp32
(``default_dtype``), and which Winograd kernel build fits (``winograd_isa``). Each answer was measured
on the CPU kind it names (benchmarks/CPU.md); nothing here runs a kernel.

- AMX (Sapphire Rapids and later Xeons): oneDNN's bf16 convolutions run on the tile units, several
  times the fp32 rate; bf16 decodes hold ~54 dB against fp32 on the real taef2 weights.
- AVX-512-BF16 without AMX (AMD Zen 4/5, Cooper Lake): bf16 dot products at twice the fp32 rate
  (measured on Zen 4: 107 against 57 GMAC/s per core); our bf16 Winograd kernel at F(4x4) decodes
  1.9x and encodes 2.1x faster than fp32 there, at 47.7-52.8 dB / 54.3-58.7 dB: bf16.
- AVX2 (no AVX-512): bf16 is emulated, several times slower: fp32.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from taesd import settings

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Isa:
    """The instruction-set features that decide a kernel or a precision."""
    avx2: bool = False
    fma: bool = False
    avx512f: bool = False
    avx512_bf16: bool = False
    avx512_vnni: bool = False
    amx_tile: bool = False
    amx_bf16: bool = False
    amx_int8: bool = False
    torch_capability: str = ""   # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", ...

    @property
    def amx(self) -> bool:
        return self.amx_tile and self.amx_bf16

    @property
    def level(self) -> str:
        """The best tier, for tables and logs: amx, avx512_bf16, avx512, avx2 or baseline."""
        if self.amx:
            return "amx"
        if self.avx512_bf16:
            return "avx512_bf16"
        if self.avx512f:
            return "avx512"
        return "avx2" if self.avx2 and self.fma else "baseline"

    def describe(self) -> str:
        names = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
                             "amx_int8") if getattr(self, f)]
        listed = ", ".join(names) or "none of avx2/avx512/amx"
        return f"{self.level} ({listed}; torch: {self.torch_capability})"


def parse_flags(cpuinfo: str) -> set[str]:
    """The flags of the first processor in a /proc/cpuinfo text (all cores of a machine share them)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def from_flags(flags: set[str], torch_capability: str = "") -> Isa:
    return Isa(avx2="avx2" in flags, fma="fma" in flags, avx512f="avx512f" in flags,
               avx512_bf16="avx512_bf16" in flags, avx512_vnni="avx512_vnni" in flags,
               amx_tile="amx_tile" in flags, amx_bf16="amx_bf16" in flags, amx_int8="amx_int8" in flags,
               torch_capability=torch_capability)


# The flags each tier takes away when $TAESD_ISA caps the CPU below it (prefixes).
ABOVE = {"avx2": ("avx512", "amx"), "avx512": ("avx512_bf16", "amx"), "avx512_bf16": ("amx",), "amx": ()}


def cap(flags: set[str], tier: str | None) -> set[str]:
    """``flags`` as a CPU of at most ``tier`` would have them (None: as they are)."""
    if tier is None:
        return set(flags)
    return {f for f in flags if not f.startswith(ABOVE[tier])}


def cpu_flags() -> set[str]:
    """This machine's CPU flags, capped by ``$TAESD_ISA``."""
    try:
        flags = parse_flags(CPUINFO.read_text())
    except OSError:
        flags = set()
    return cap(flags, settings.isa_cap())


@functools.lru_cache(maxsize=1)
def detect() -> Isa:
    """This machine's features (cached: they do not change while a process runs), capped by
    ``$TAESD_ISA``. Off Linux or off x86 every flag is False and the policy falls back to fp32 with
    oneDNN's direct convolution."""
    return from_flags(cpu_flags(), torch.backends.cpu.get_cpu_capability())


_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@functools.lru_cache(maxsize=1)
def l3_cache_bytes() -> "int | None":
    """The last-level (L3) cache this CPU reports (Linux sysfs, cpu0), in bytes; None where unknown."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(root.glob("index*")):
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip()
                unit = _SIZE_UNITS.get(size[-1:].upper(), 1)
                return int(size.rstrip("KMGkmg")) * unit
    except (OSError, ValueError):
        return None
    return None


def default_dtype(isa: Isa | None = None) -> torch.dtype:
    """The precision an fp32 model computes in on this CPU when no dtype was asked for: bf16 where
    the CPU has native bf16 (AMX; AVX-512-BF16 dot products, as on AMD Zen 4), which is where it is
    both faster and >= 40 dB against fp32 (benchmarks/CPU.md, benchmarks/CPU_ZEN4.md), as OpenVINO's
    default is on both; else fp32 (AVX2 only emulates bf16). An explicit dtype always wins over this
    (``CpuExecutor.compute_dtype``)."""
    isa = detect() if isa is None else isa
    return torch.bfloat16 if isa.amx or isa.avx512_bf16 else torch.float32


def winograd_bf16(isa: Isa | None = None) -> bool:
    """Our bf16 Winograd kernel (AVX-512-BF16 dot products) pays: not where AMX runs oneDNN's direct
    bf16 convolutions on its tile units (measured on a Sapphire Rapids Xeon, 512² decode, 2 threads:
    direct 0.090 s, Winograd 0.44 s)."""
    isa = detect() if isa is None else isa
    return isa.avx512_bf16 and not isa.amx


def winograd_isa(isa: Isa | None = None) -> str | None:
    """The Winograd kernel build for this CPU: "avx512", "avx2", or None (no kernel: direct convs)."""
    isa = detect() if isa is None else isa
    if isa.avx512f and isa.fma:
        return "avx512"
    return "avx2" if isa.avx2 and isa.fma else None
