"""Memory promises: the cgroup limit caps automatic tiling; --max-memory holds on the CPU
executors (fast and plain, glibc's allocator setting on: TAESD_MALLOPT); a budget that makes the run
far slower says so before it starts.

Peak resident memory is measured in a fresh subprocess: the kernel's peak (VmHWM), reset once the
model is loaded, minus the resident size then (ru_maxrss would carry the forking parent's peak).
Stated tolerance: the peak above the loaded model stays within 10% of the budget (PEAK_TOLERANCE)."""
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from taesd import tiling
from taesd.tiling import memory

PEAK_TOLERANCE = 0.10
ROOT = Path(__file__).resolve().parents[1]


def _fake_cgroup(tmp_path, files: dict) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_cgroup_v2_limit_minus_usage(tmp_path, monkeypatch):
    folder = _fake_cgroup(tmp_path, {"memory.max": "2147483648\n", "memory.current": "536870912\n",
                                     "memory.stat": "anon 1\ninactive_file 268435456\n"})
    assert memory.cgroup_headroom(folder) == 2**31 - (2**29 - 2**28)
    monkeypatch.setenv(memory.CGROUP_ENV, str(folder))
    assert memory.available_bytes() == min(memory.host_available(), 2**31 - 2**28)
    assert memory.available_memory(__import__("torch").device("cpu")) == memory.available_bytes()


def test_cgroup_v1_and_unlimited(tmp_path):
    v1 = _fake_cgroup(tmp_path, {"memory.limit_in_bytes": str(3 << 30),
                                 "memory.usage_in_bytes": str(1 << 30)})
    assert memory.cgroup_headroom(v1) == 2 << 30
    (tmp_path / "memory.limit_in_bytes").write_text("9223372036854771712\n")   # v1: no limit
    assert memory.cgroup_headroom(v1) is None
    v2 = tmp_path / "v2"
    v2.mkdir()
    _fake_cgroup(v2, {"memory.max": "max\n", "memory.current": "5\n"})
    assert memory.cgroup_headroom(v2) is None


def test_own_cgroups_from_proc_file(tmp_path):
    mount = tmp_path / "cg"
    (mount / "memory" / "a" / "b").mkdir(parents=True)
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/a/b\n0::/\n")
    found = memory.own_cgroups(str(proc), mount)
    assert found[:3] == [mount / "memory" / "a" / "b", mount / "memory" / "a", mount / "memory"]


def test_small_cgroup_makes_the_plan_tile(tmp_path, monkeypatch):
    import torch

    import taesd
    model = taesd.create("taesd", seed=0, parts="decoder")
    an = tiling.analyse(model, "decoder")
    pass_ = tiling.Pass(1, 256, 256, 4, 3, tiling.memory_overhead(model, an))
    whole = tiling.estimate_peak(an, pass_)
    folder = _fake_cgroup(tmp_path, {"memory.max": str(whole // 2), "memory.current": "0"})
    monkeypatch.setenv(memory.CGROUP_ENV, str(folder))
    p = tiling.plan(an, pass_, available=memory.available_memory(torch.device("cpu")))
    assert p.tiled and p.estimate <= whole // 2


PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch, taesd
    def status(key):   # kB fields of /proc/self/status
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
    torch.set_num_threads(2)
    weights, budget, side, executor = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    model = taesd.load("taef2", weights=[weights], executor=executor)
    # The first call at a size the fast kernels take makes the executor's per-model caches
    # (transformed and packed weights, ~40 MiB): memory of the loaded model, not of the pass.
    model.decode(torch.randn(1, 32, 24, 24))
    latents = torch.randn(1, 32, side, side)
    # Reset the peak (VmHWM) to the current RSS: ru_maxrss would keep the high-water mark of the
    # forked parent (pytest, GBs after the pipeline tests) and of the start-up.
    open("/proc/self/clear_refs", "w").write("5")
    rss = status("VmRSS:")
    out = model.decode(latents, max_memory=budget)
    assert out.shape == (1, 3, 8 * side, 8 * side)
    print(status("VmHWM:") - rss)
""")


def _peak_above_model(weights, budget: str, side: int, executor: str, **env) -> int:
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(weights / "taef2_decoder.pth"), budget,
                           str(side), executor], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


@pytest.mark.parametrize("winograd", ["1", "0"])
def test_max_memory_peak_rss_2048_taef2_decode(weights, winograd):
    """--max-memory 1GiB on a 2048 x 2048 taef2 decode: peak within PEAK_TOLERANCE of 1 GiB above
    the loaded model, on the Winograd path and on the direct-convolution fallback."""
    peak = _peak_above_model(weights, "1GiB", 256, "fast", TAESD_WINOGRAD=winograd)
    assert peak <= (1 + PEAK_TOLERANCE) * 2**30, f"peak {peak / 2**20:.0f} MiB above the model"


@pytest.mark.parametrize("executor", ["plain", "fast"])
def test_small_budget_holds_on_the_plain_and_fast_executors(weights, executor):
    """A 1024 x 1024 decode under 150 MiB (about a sixth of the untiled pass). The plain executor
    peaked at 1.74x the budget before tiling bounded glibc's heap in every process (it left an
    untuned allocator alone), the fast one at 1.28x before its first-use caches counted with the model."""
    budget = 150 * 2**20
    peak = _peak_above_model(weights, str(budget), 128, executor)
    assert peak <= (1 + PEAK_TOLERANCE) * budget, f"peak {peak / 2**20:.0f} MiB above the model"


def test_a_budget_that_makes_the_run_far_slower_says_so_up_front():
    import torch

    import taesd
    from taesd.tiling import runner
    model = taesd.create("taesd", seed=0, parts="decoder")
    latents = torch.randn(1, 4, 24, 24)
    an = tiling.analyse(model, "decoder")
    pass_ = tiling.pass_of(model, an, latents)
    small = tiling.plan(an, pass_, max_memory="8MiB")
    assert small.work >= runner.SLOW_FACTOR and small.tile == (8, 8)
    with pytest.warns(UserWarning, match=r"8 MiB cuts each image into 9 tiles of 8x8 .* the work of an untiled"):
        model.decode(latents, max_memory="8MiB")
    roomy = tiling.plan(an, pass_, max_memory="64MiB")
    assert roomy.work < runner.SLOW_FACTOR
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.decode(latents, max_memory="64MiB")


CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def _make_v1_cgroup(limit: int) -> "Path | None":
    own = [p for p in memory.own_cgroups() if p.is_relative_to(CGROUP_V1)]
    if not own:
        return None
    child = own[0] / f"taesd-test-{os.getpid()}"
    try:
        child.mkdir()
        (child / "memory.limit_in_bytes").write_text(str(limit))
    except OSError:
        if child.is_dir():
            child.rmdir()
        return None
    return child


def test_default_run_in_a_2gib_cgroup_finishes(weights, tmp_path):
    """A real memory cgroup of 2 GiB (this machine lets root create cgroup v1 groups; skipped
    where it does not): a default 2048 x 2048 taef2 decode tiles by itself and is not OOM-killed."""
    group = _make_v1_cgroup(2 << 30)
    if group is None:
        pytest.skip("cannot create a memory cgroup here (the fake-file tests cover the reader)")
    script = textwrap.dedent(f"""
        import os, sys, torch, taesd
        open({str(group / 'cgroup.procs')!r}, "w").write(str(os.getpid()))
        from taesd.tiling import memory
        print("headroom", memory.cgroup_available())
        model = taesd.load("taef2", weights=[sys.argv[1]])
        out = model.decode(torch.randn(1, 32, 256, 256))
        print("ok", tuple(out.shape))
    """)
    try:
        proc = subprocess.run([sys.executable, "-c", script, str(weights / "taef2_decoder.pth")],
                              capture_output=True, text=True, timeout=600)
    finally:
        group.rmdir()
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-1500:]}"
    assert "ok (1, 3, 2048, 2048)" in proc.stdout
    headroom = int(proc.stdout.split("headroom")[1].split()[0])
    assert headroom <= 2 << 30
