"""CPU feature detection (taesd.runtime.isa) on planted /proc/cpuinfo texts, and the policy it drives."""
import torch

from taesd.runtime import isa

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
    assert isa.default_dtype(zen4) == torch.float32 and isa.default_dtype(zen2) == torch.float32
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
