"""The executor layer: one resolver for every entry point, one dtype rule, the old switches, and the
GPU hot path without host syncs.

Everything runs on the CPU. The CUDA executor reaches the entry points through the injected fakes
of tests/test_cuda_path.py: ``executors.FAST["cpu"]`` made to hand out the CUDA executor with a fake
graph capture, and ``value_checks.DEFERRED["cpu"]`` a fake event, so the GPU's code paths (graph
replay, queued input checks) run here and the host syncs they make can be counted.
"""
from __future__ import annotations

import functools
import os
import types
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import taesd  # noqa: E402
import taesd.loader  # noqa: E402
from taesd import TaesdError, value_checks  # noqa: E402
from taesd.integrations.diffusers import TaesdVAE  # noqa: E402
from taesd.integrations.diffusers.preview import PreviewCallback  # noqa: E402
from taesd.integrations.diffusers.vae import use_taesd_vae  # noqa: E402
from taesd.options import LoadOptions  # noqa: E402
from taesd.runtime import executors  # noqa: E402
from taesd.runtime.executors import cuda, cuda_graphs  # noqa: E402
from taesd.runtime.executors.cpu import CpuExecutor, FastSequential  # noqa: E402
from taesd.runtime.executors.cuda import CudaExecutor  # noqa: E402


class FakeCapture:
    """A stand-in for CUDA graph capture (as in test_cuda_path): replays rerun the function."""

    def __init__(self):
        self.captured = []

    def __call__(self, fn, x):
        static = cuda_graphs.static_like(x)
        self.captured.append(tuple(x.shape))

        def replay(y):
            static.copy_(y)
            return fn(static).clone()

        return replay


class FakeEvent:
    """A stand-in for torch.cuda.Event: done when the test says so (or when waited for)."""

    done = False

    def record(self):
        pass

    def query(self):
        return FakeEvent.done

    def synchronize(self):
        FakeEvent.done = True


@pytest.fixture
def fake_gpu(monkeypatch):
    """On this CPU: "fast" is the CUDA executor with a fake capture, input checks are queued."""
    capture = FakeCapture()
    factory = functools.partial(CudaExecutor, capture=capture, mem_get_info=lambda d: (2**34, 2**34))
    monkeypatch.setitem(executors.FAST, "cpu", factory)
    monkeypatch.setitem(value_checks.DEFERRED, "cpu", FakeEvent)
    FakeEvent.done = False
    value_checks._pending.clear()
    yield capture
    value_checks._pending.clear()


@pytest.fixture
def recorded(monkeypatch):
    """taesd.loader.load_with records the resolved options instead of loading."""
    seen: list[LoadOptions] = []

    def record(opts):
        seen.append(opts)
        return taesd.create(opts.variant, parts=opts.parts or ("encoder", "decoder"))

    monkeypatch.setattr(taesd.loader, "load_with", record)
    return seen


# ---------------------------------------------------------------- resolve


def test_resolve_table():
    assert executors.resolve(None, "cpu") == CpuExecutor(auto=True)
    assert executors.resolve("fast", "cuda") == CudaExecutor(auto=True)
    assert executors.resolve("fast", "mps").name == "cpu"
    assert executors.resolve("plain", "cuda").name == "plain"
    assert executors.resolve("onnxruntime", "cuda:1").device == "cuda:1"
    mine = CudaExecutor(copy_output=False)
    assert executors.resolve(mine, "cpu") is mine
    assert executors.follow(CpuExecutor(auto=True), "cuda") == CudaExecutor(auto=True)
    assert executors.follow(CpuExecutor(), "cuda") == CpuExecutor()   # chosen by name: kept
    with pytest.raises(TaesdError, match="unknown executor 'tensorrt'; use one of: fast, cpu"):
        executors.resolve("tensorrt", "cpu")


def test_apply_and_undo_record_the_executor_and_tiling_questions():
    model = taesd.create("taesd", seed=0)
    ex = CpuExecutor(use_winograd=False)
    ex.apply(model)
    assert model.executor is ex and type(model.decoder) is FastSequential and model.layerwise
    assert ex.tile_alignment(model.decoder[1]) == 0 and ex.memory_overhead == 1.2
    CudaExecutor(graphs=False).apply(model)   # another executor undoes the first
    assert isinstance(model.decoder, cuda.CudaSequential)
    assert not any(type(m).__name__.startswith("Fast") for m in model.modules())
    model.executor.undo(model)
    assert model.executor is None and type(model.decoder) is torch.nn.Sequential


# ---------------------------------------------------------------- every entry point, one executor


def test_on_a_cpu_the_drop_in_runs_the_cpu_executor_as_load_does(weights):
    model = taesd.load("taef2", weights, device="cpu")
    vae = TaesdVAE.from_pretrained(weights, taesd_variant="taef2")
    assert model.executor == vae.executor == executors.resolve(None, "cpu")
    assert type(vae.taesd.decoder) is FastSequential
    tiles = [getattr(m, "winograd", None) for m in model.decoder.modules()]
    assert [getattr(m, "winograd", None) for m in vae.taesd.decoder.modules()] == tiles
    z = torch.randn(1, 32, 8, 8)
    assert torch.equal(vae.decode(z).sample, model.decode(z).mul(2).sub(1))


def test_every_entry_point_gets_the_gpu_executor_from_resolve(fake_gpu, weights, tmp_path):
    want = executors.resolve(None, "cpu")   # the injected CUDA executor
    assert isinstance(want, CudaExecutor)
    z = torch.randn(1, 32, 8, 8)
    loaded = taesd.load("taef2", weights, device="cpu")
    vae = TaesdVAE.from_pretrained(weights, taesd_variant="taef2")
    built = TaesdVAE(taesd_variant="taef2")
    pipe = use_taesd_vae(types.SimpleNamespace(vae=None), variant="taef2")
    for model in (loaded, vae.running_model(), built.running_model(), pipe.vae.running_model()):
        assert model.executor == want and isinstance(model.decoder, cuda.CudaSequential)
    assert pipe.vae.taesd.executor is not None   # use_taesd_vae kept the executor of its own load
    for _ in range(3):
        vae.decode(z)
    assert cuda.graph_cache(vae.taesd, "decoder").stats.replays == 1   # the graph replays in the drop-in
    preview = PreviewCallback(pipe, on_preview=lambda frame: None)
    assert preview._model(z.device).executor == want
    from taesd.cli import build_parser
    from taesd.cli.common import open_model
    args = build_parser().parse_args(["decode", "x.safetensors", "-v", "taef2", "-w", str(weights)])
    assert args.executor is None and args.dtype is None
    assert open_model(args, ("decoder",)).executor == want


def test_to_and_half_re_resolve_the_executor(monkeypatch):
    vae = TaesdVAE(taesd_variant="taesd")
    assert vae.executor == CpuExecutor(auto=True)
    factory = functools.partial(CudaExecutor, graphs=False)
    monkeypatch.setitem(executors.FAST, "cpu", factory)   # as if the model had moved to a GPU
    vae.to(torch.float32)
    assert type(vae.taesd.decoder) is torch.nn.Sequential   # .to(): the plain modules ...
    assert vae.executor == factory(auto=True)                # ... and the new device's executor
    vae.half()
    assert vae.executor == factory(auto=True) and vae.taesd.dtype == torch.float16
    assert isinstance(vae.taesd.decoder, cuda.CudaSequential)
    plain = TaesdVAE(taesd_variant="taesd", executor="plain").to(torch.float32)
    assert plain.executor.name == "plain" and plain.config.executor == "plain"
    with pytest.raises(TaesdError, match="not 'onnxruntime'"):
        TaesdVAE(taesd_variant="taesd", executor="onnxruntime")


def test_a_bare_taesd_moved_gets_the_new_devices_executor(monkeypatch):
    """taesd.load's model, moved with .to()/.half(), runs the executor of where it now is."""
    model = taesd.create("taesd", seed=0)
    executors.resolve(None, "cpu").apply(model)
    assert model.executor == CpuExecutor(auto=True)
    factory = functools.partial(CudaExecutor, graphs=False)
    monkeypatch.setitem(executors.FAST, "cpu", factory)   # as if the model had moved to a GPU
    model.half()
    assert model.executor == factory(auto=True) and model.dtype == torch.float16
    assert isinstance(model.decoder, cuda.CudaSequential)
    monkeypatch.undo()
    pinned = executors.resolve("plain", "cpu").apply(taesd.create("taesd", seed=0))
    pinned.to(torch.float64)
    assert pinned.executor.name == "plain" and pinned.dtype == torch.float64


# ---------------------------------------------------------------- one dtype rule


@pytest.mark.parametrize("device, capability, want", [
    ("cpu", None, torch.float32), ("cuda", (9, 0), torch.float16), ("cuda", (6, 1), torch.float32)])
def test_every_entry_point_gives_the_same_dtype(device, capability, want, recorded, monkeypatch, tmp_path,
                                                weights):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(taesd.loader, "check_device", lambda name: None)
    from taesd.cli import build_parser, common
    from taesd.cli import eval as cli_eval
    from taesd.cli.common import open_model
    monkeypatch.setattr(common, "check_device", lambda name: None)
    monkeypatch.setattr(cli_eval, "check_device", lambda name: None)
    got = {"load": LoadOptions.resolve("taef2", device=device).dtype}
    taesd.load("taef2", device=device)
    got["load()"] = recorded[-1].dtype
    open_model(build_parser().parse_args(["decode", "x.png", "-v", "taef2", "--device", device]), None)
    got["cli"] = recorded[-1].dtype
    (tmp_path / "a.png").write_bytes(b"")
    cli_eval.run(build_parser().parse_args(["eval", str(tmp_path / "a.png"), "-v", "taef2", "--device", device]))
    got["eval"] = recorded[-1].dtype
    preview = PreviewCallback(on_preview=lambda f: None, variant="taef2")
    preview.contract = types.SimpleNamespace(variant="taef2")
    preview._model(torch.device(device))
    got["preview"] = recorded[-1].dtype
    assert recorded[-1].executor == executors.resolve(None, device)
    moved = []
    monkeypatch.setattr(TaesdVAE, "to", lambda self, device=None, dtype=None: moved.append(dtype) or self)
    TaesdVAE.from_pretrained(str(weights), taesd_variant="taef2", device=device)
    got["TaesdVAE"] = moved[-1]
    assert got == dict.fromkeys(got, want)


# ---------------------------------------------------------------- the old switches


@pytest.mark.parametrize("switch, name", [({"fast": False}, "plain"), ({"compile": True}, "compile"),
                                          ({"backend": "onnxruntime"}, "onnxruntime"), ({"fast": True}, "cpu")])
def test_old_switches_warn_once_and_still_work(switch, name, recorded):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        taesd.load("taef2", device="cpu", **switch)
    assert [w.category for w in caught] == [DeprecationWarning]
    assert "use executor=" in str(caught[0].message) and caught[0].filename == __file__
    assert recorded[-1].executor.name == name
    with pytest.raises(TaesdError, match="unknown backend"):
        taesd.load("taef2", backend="tensorrt")


def test_cli_backend_is_an_alias_of_executor(recorded):
    from taesd.cli import build_parser
    from taesd.cli.common import open_model
    args = build_parser().parse_args(["encode", "x.png", "-v", "taef2", "--backend", "onnxruntime"])
    open_model(args, None)
    assert recorded[-1].executor.name == "onnxruntime" and recorded[-1].device.type == "cpu"


# ---------------------------------------------------------------- the GPU hot path: no host sync


SYNCS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def count_syncs(monkeypatch) -> list:
    """Every way the host can read a device value, counted while it runs."""
    calls = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **k):
            calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append("synchronize"))
    return calls


def test_decode_makes_no_host_sync_and_a_nan_still_ends_in_one_line(fake_gpu, monkeypatch):
    vae = TaesdVAE(taesd_variant="taesd")
    z = torch.randn(1, 4, 8, 8)
    for _ in range(2):   # first sight, capture
        vae.decode(z)
    calls = count_syncs(monkeypatch)
    for _ in range(3):
        vae.decode(z)
        vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert calls == [] and cuda.graph_cache(vae.taesd, "decoder").stats.replays == 3
    monkeypatch.undo()
    monkeypatch.setitem(value_checks.DEFERRED, "cpu", FakeEvent)
    bad = z.clone()
    bad[0, 1, 2, 3] = float("nan")
    vae.decode(bad)                       # queued: no wait, no error yet
    FakeEvent.done = True                 # the device has got there
    with pytest.raises(TaesdError) as e:  # the next call reads the verdict, free
        vae.decode(z)
    assert str(e.value) == ("the latents of an earlier call hold 1 NaN value (first at index (0, 1, 2, 3)); "
                            "fix what produced them")
    FakeEvent.done = False
    with pytest.raises(TaesdError, match="image values reach 255"):
        vae.taesd.encode(torch.full((1, 3, 64, 64), 255.0))
        taesd.raise_input_errors()        # waits: the error of this very call


def test_queued_checks_are_bounded(fake_gpu, monkeypatch):
    monkeypatch.setattr(value_checks, "MAX_PENDING", 2)
    for _ in range(3):
        value_checks.check_values(torch.zeros(1, 4, 2, 2), "latents")
    assert len(value_checks._pending) == 2 and FakeEvent.done   # the oldest was waited for


def test_copy_output_false_hands_out_the_graph_buffer():
    x = torch.ones(1, 2, 4, 4)

    class Graph:
        def replay(self):
            run.static_out.copy_(run.static_in * 2)

    run = cuda_graphs.CapturedRun(Graph(), torch.zeros_like(x), torch.zeros_like(x), copy_output=False)
    first = run(x)
    assert first is run.static_out and torch.equal(first, x * 2)
    run(x + 1)                       # the next call of this shape overwrites it
    assert torch.equal(first, (x + 1) * 2)
    run = cuda_graphs.CapturedRun(Graph(), torch.zeros_like(x), torch.zeros_like(x))
    assert run(x) is not run.static_out and torch.equal(run(x), x * 2)


def test_cuda_rewrite_passes_run_at_apply_and_undo_puts_the_original_back(monkeypatch):
    seen = []

    def rewrite(part):
        seen.append(len(part))
        return torch.nn.Sequential(*part)   # new container, same layers (so the same Parameters)

    monkeypatch.setattr(cuda, "REWRITES", [rewrite])
    model = taesd.create("taesd", seed=0)
    original, keys = model.decoder, list(model.state_dict())
    z = torch.randn(1, 4, 8, 8)
    want = model.decode(z)
    CudaExecutor(graphs=False).apply(model)
    assert seen == [len(model.encoder), len(original)] and model.decoder is not original
    assert isinstance(model.decoder, cuda.CudaSequential) and list(model.state_dict()) == keys
    torch.testing.assert_close(model.decode(z), want, atol=1e-5, rtol=1e-5)
    model.executor.undo(model)
    assert model.decoder is original and type(original) is torch.nn.Sequential
    assert not any(isinstance(m, cuda.CudaBlock) for m in model.modules())
