"""Our C++ kernels, compiled on first use: one shared library per source file and CPU, cached.

Each kernel (``_winograd.cpp``, ``_amx_conv.cpp``) is a plain C ABI called through ctypes, so nothing
needs PyTorch headers and nothing is compiled at install time. Its threads are OpenMP's, which in a
process with PyTorch are PyTorch's own pool (pthreads where the compiler has no OpenMP). It is built
with ``-march=native`` into ``$TAESD_CACHE_DIR`` (default ``~/.cache/taesd``), keyed by the source and
the CPU's flags (code built for one CPU must not run on another), atomically (a temp file renamed
into place). ``$TAESD_ISA`` caps the flags (``-mno-avx512f`` ... for a CPU tier below this one's).
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from taesd import settings
from taesd.runtime import isa

# What -march=native must leave out on a CPU capped by $TAESD_ISA (GCC and Clang spellings).
NO_AMX = ("-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8")
CAP_FLAGS = {"avx2": ("-mno-avx512f", *NO_AMX), "avx512": ("-mno-avx512bf16", *NO_AMX),
             "avx512_bf16": NO_AMX, "amx": (), None: ()}


def cpu_signature() -> str:
    """The CPU's flags as taesd uses them (``$TAESD_ISA`` capped): the key of a -march=native build."""
    flags = isa.cpu_flags()
    return " ".join(sorted(flags)) if flags else platform.processor() or platform.machine()


def library_path(source: Path, stem: str) -> Path:
    key = hashlib.sha256(source.read_bytes() + cpu_signature().encode()).hexdigest()[:16]
    return settings.cache_dir() / f"{stem}-{platform.machine()}-{key}.so"


def compiler() -> str | None:
    for cxx in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cxx and shutil.which(cxx):
            return cxx
    return None


def build(source: Path, stem: str, needs: tuple[str, ...], force: bool = False) -> Path:
    """Compile ``source`` for this CPU into the cache (once). ``needs``: the CPU flags it requires.
    Raises RuntimeError with the reason when it cannot."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"the {stem} kernel needs x86-64 (this is {platform.machine()})")
    flags = set(cpu_signature().split())
    missing = [f for f in needs if f not in flags]
    if missing:
        raise RuntimeError(f"the {stem} kernel needs a CPU with {', '.join(missing)}")
    out = library_path(source, stem)
    if out.exists() and not force:
        return out
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, "-O3", "-march=native", *CAP_FLAGS[settings.isa_cap()], "-std=c++17", "-fPIC", "-shared",
           "-pthread", "-Wno-ignored-attributes", str(source), "-o", tmp]
    try:
        # With OpenMP the kernels run on PyTorch's own threads: the library asks for libgomp.so.1,
        # which is the copy torch already loaded (same soname), so no second pool spins beside it.
        # A compiler without OpenMP builds the pthread version.
        proc = subprocess.run(cmd[:1] + ["-fopenmp"] + cmd[1:], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
