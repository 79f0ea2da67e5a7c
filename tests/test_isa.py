"""CPU feature detection (taesd.runtime.isa) on planted /proc/cpuinfo texts, the policy it drives, and
$TAESD_ISA's cap (a newer CPU running an older one's paths)."""
import os
import subprocess
import sys

import pytest
import torch

from taesd import settings
from taesd.errors import TaesdError
from taesd.runtime import isa, native

# Flag lines as real machines print them (trimmed): an AVX2-only EPYC (Zen 2), a Zen 4 EPYC
# (AVX-512 with BF16 and VNNI, no AMX), a Sapphire Rapids Xeon (AMX).
ZEN2 = "fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c bmi1 avx2 bmi2 sha_ni"
ZEN4 = ZEN2 + " avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni"
SPR = ZEN4 + " avx512_fp16 avx_vnni amx_bf16 amx_tile amx_int8"


def cpuinfo(flags: str) -> str:
    return (f"processor\t: 0\nvendor_id\t: X\nmodel name\t: Test CPU\nflags\t\t: {flags}\nbugs\t\t: spectre_v1\n\n"
            "processor\t: 1\nflags\t\t: fpu\n")


def test_parse_reads_the_first_processors_flags_only():
    flags = isa.parse_flags(cpuinfo(SPR))
    assert "amx_tile" in flags and "avx2" in flags and "spectre_v1" not in flags
    assert isa.parse_flags("processor : 0\nmodel name : no flags line\n") == set()


def test_tiers_from_planted_flags():
    zen2, zen4, spr = (isa.from_flags(isa.parse_flags(cpuinfo(f))) for f in (ZEN2, ZEN4, SPR))
    assert (zen2.level, zen4.level, spr.level) == ("avx2", "avx512_bf16", "amx")
    assert zen2.avx2 and zen2.fma and not zen2.avx512f and not zen2.avx512_bf16
    assert zen4.avx512f and zen4.avx512_bf16 and zen4.avx512_vnni and not zen4.amx
    assert spr.amx and spr.amx_int8 and spr.amx_bf16
    assert isa.from_flags({"avx512f", "fma"}).level == "avx512"
    assert isa.from_flags(set()).level == "baseline"
    assert "amx_tile" in spr.describe() and "avx2" in zen2.describe()


def test_policy_per_tier():
    zen2, zen4, spr = (isa.from_flags(isa.parse_flags(cpuinfo(f))) for f in (ZEN2, ZEN4, SPR))
    assert isa.default_dtype(spr) == torch.bfloat16
    # Zen 4 (AVX-512-BF16, no AMX): bf16 through the bf16 Winograd kernel, as OpenVINO defaults there too
    assert isa.default_dtype(zen4) == torch.bfloat16 and isa.default_dtype(zen2) == torch.float32
    assert isa.winograd_isa(zen2) == "avx2" and isa.winograd_isa(zen4) == "avx512"
    assert isa.winograd_isa(isa.from_flags({"sse4_2"})) is None


def test_detect_reads_this_machine():
    here = isa.detect()
    assert here is isa.detect()   # cached
    assert here.torch_capability == torch.backends.cpu.get_cpu_capability()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return
    assert here.avx2 == ("avx2" in isa.parse_flags(text))


def test_a_cap_takes_away_the_tiers_above_it():
    spr = isa.parse_flags(cpuinfo(SPR))
    assert isa.from_flags(isa.cap(spr, "avx2")).level == "avx2"
    assert isa.from_flags(isa.cap(spr, "avx512")).level == "avx512"
    assert isa.from_flags(isa.cap(spr, "avx512_bf16")).level == "avx512_bf16"
    assert isa.cap(spr, "amx") == spr and isa.cap(spr, None) == spr
    assert "sse4_2" in isa.cap(spr, "avx2") and not any(f.startswith("avx512") for f in isa.cap(spr, "avx2"))


def test_an_unknown_cap_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("TAESD_ISA", "avx3")
    with pytest.raises(TaesdError, match="TAESD_ISA must be one of avx2, avx512"):
        settings.isa_cap()


CAPPED_CHILD = r"""
import torch, taesd
from taesd.runtime import amx, isa, winograd
from taesd.runtime.executors import CpuExecutor
assert isa.detect().level == "avx2", isa.detect().describe()
assert not amx.available() and winograd.gemm_width() == 256, (amx.load_error(), winograd.gemm_width())
plain = taesd.create("taesd", seed=0)
fast = CpuExecutor().apply(taesd.create("taesd", seed=0))
assert fast.compute_dtype == torch.float32          # no AMX: fp32 is the default
z, x = torch.randn(1, 4, 32, 32), torch.rand(1, 3, 256, 256)
with torch.no_grad():
    d = (fast.decode(z) - plain.decode(z)).abs().max().item()
    e = (fast.encode(x) - plain.encode(x)).abs().max().item()
    assert fast.decoder[3].conv[0].winograd_tile(torch.zeros(1, 64, 64, 64)) == 4
    assert torch.equal(fast.decode(z, tile_size=16), fast.decode(z))
assert d < 1e-4 and e < 1e-4, (d, e)
print("avx2 paths ok", d, e)
"""


def test_a_process_capped_to_avx2_builds_and_runs_the_avx2_kernels(tmp_path):
    """The AVX2 build of the Winograd kernel (its transforms and GEMM) on whatever CPU runs the
    tests: with TAESD_ISA=avx2 the kernel is compiled without AVX-512, AMX is off, fp32 is the
    default, and the fast executor stays within 1e-4 of the plain network, tiles exact."""
    here = isa.detect()
    if not (here.avx2 and here.fma) or native.compiler() is None:
        pytest.skip("needs an x86 CPU with AVX2 and FMA and a C++ compiler")
    env = {k: v for k, v in os.environ.items() if k != "TAESD_CPU_BF16"}   # the CPU's own rule
    env.update(TAESD_ISA="avx2", TAESD_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", CAPPED_CHILD], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "avx2 paths ok" in r.stdout, r.stderr[-3000:]
    built = [p.name for p in tmp_path.iterdir()]
    assert any(n.startswith("winograd-") for n in built) and not any(n.startswith("amx_conv") for n in built)


def test_every_native_kernel_this_cpu_can_run_builds_here():
    """A kernel that fails to compile is not silently skipped: where the CPU has what a kernel needs and a
    compiler is found, the kernel loads (its tests would otherwise all skip and the slow path run)."""
    from taesd.runtime import amx, narrow, winograd
    if native.compiler() is None:
        pytest.skip("no C++ compiler here")
    cpu = isa.detect()
    checked = 0
    if cpu.avx2 and cpu.fma:
        assert winograd.library() is not None, winograd.load_error()
        assert narrow.library() is not None, narrow.load_error()
        checked += 2
    if cpu.amx:
        assert amx.library() is not None, amx.load_error()
        checked += 1
    if not checked:
        pytest.skip(f"this CPU ({cpu.level}) runs none of the native kernels")
