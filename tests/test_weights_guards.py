"""Weights that other programs read right, or that we refuse in one line: ComfyUI's conventions (as
data), ONNX metadata that states the real latent contract, bounded and shared-storage .pth reading,
safe dtype casts, a hash record that cannot silently reset, a fast offline failure, latent files
whose variant contradicts --variant, and the one resolver every caller uses."""
import io
import os
import re
import socket
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import taesd
from conftest import ROOT
from taesd.cli import main
from taesd.errors import TaesdError
from taesd.io.weights import comfyui, download
from taesd.io.weights.source import read_source
from taesd.io.weights.write import save_weights, state_dicts

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")) if root.exists() else []


# ---------------------------------------------------------------- ComfyUI


def test_comfyui_taeqi2_1_file_follows_comfyuis_convention(tmp_path):
    """ComfyUI decodes raw latents x as taesd_decoder((x - vae_shift) * vae_scale), and its QwenImage21
    latent format normalises as (x - latents_mean) / latents_std: the file must make the two agree."""
    model = taesd.create("taeqi2_1", seed=0)
    save_weights(state_dicts(model), "taeqi2_1", "pth", tmp_path / "pth")
    sources = [str(tmp_path / "pth" / f"taeqi2_1_{p}.pth") for p in ("encoder", "decoder")]
    out = tmp_path / "comfy" / "taeqi2_1.safetensors"
    assert main(["convert", *sources, "--to", "comfyui", "-o", str(out)]) == 0
    stored = load_file(out)
    scale, shift = stored["vae_scale"], stored["vae_shift"]
    assert scale.shape == shift.shape == (64, 1, 1)
    mean = torch.tensor(comfyui.QWEN21_LATENTS_MEAN).reshape(1, 64, 1, 1)
    std = torch.tensor(comfyui.QWEN21_LATENTS_STD).reshape(1, 64, 1, 1)
    assert mean.shape == std.shape == (1, 64, 1, 1)
    raw = torch.randn(2, 64, 3, 3) * 4 + 1
    comfy_input = (raw - shift) * scale                      # what ComfyUI hands the decoder
    ours = (raw - mean) / std                                # this project's mean_std contract
    assert (comfy_input - ours).abs().max() < 1e-5
    # decoding through ComfyUI's formula gives what taesd's own decode of the contract latent gives
    with torch.no_grad():
        assert torch.allclose(model.decoder(comfy_input[:1, :, :2, :2]), model.decoder(ours[:1, :, :2, :2]),
                              atol=1e-4)
    # a file with the old identity values (1 and 0) is rewritten with the convention, not copied
    stored["vae_scale"], stored["vae_shift"] = torch.ones(64, 1, 1), torch.zeros(64, 1, 1)
    save_file(stored, str(tmp_path / "old.safetensors"))
    assert main(["convert", str(tmp_path / "old.safetensors"), "--to", "comfyui",
                 "-o", str(tmp_path / "again.safetensors")]) == 0
    assert torch.equal(load_file(tmp_path / "again.safetensors")["vae_scale"], scale)


def test_comfyui_target_for_taesana_is_refused_and_writes_nothing(tmp_path, capsys):
    save_weights(state_dicts(taesd.create("taesana", seed=0)), "taesana", "pth", tmp_path / "pth")
    before = files_under(tmp_path)
    out = tmp_path / "out" / "taesana.safetensors"
    assert main(["convert", str(tmp_path / "pth" / "taesana_encoder.pth"), "--to", "comfyui", "-o", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "ComfyUI has no taesana network" in err and "nothing was written" in err
    assert files_under(tmp_path) == before


def test_info_on_per_channel_scale_and_a_three_element_scale(tmp_path, capsys):
    (path,) = save_weights(state_dicts(taesd.create("taeqi2_1", seed=0)), "taeqi2_1", "comfyui", tmp_path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "vae_scale: 64 per-channel values" in out and "vae_shift: 64 per-channel values" in out
    stored = load_file(path)
    stored["vae_scale"] = torch.tensor([1.0, 2.0, 3.0])
    save_file(stored, str(tmp_path / "three.safetensors"))
    assert main(["info", str(tmp_path / "three.safetensors")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "vae_scale holds 3 values but the network has 64 latent channels" in err
    with pytest.raises(TaesdError, match="vae_scale holds 3 values"):
        taesd.load("taeqi2_1", tmp_path / "three.safetensors", device="cpu")


# ---------------------------------------------------------------- ONNX metadata


@pytest.mark.parametrize("name,words", [("taef2", "BatchNorm-normalised"), ("taeqi2_1", "latents_mean")])
def test_onnx_metadata_states_the_real_latent_contract(name, words):
    from taesd.export.onnx import metadata
    meta = metadata(name, "decoder", False)
    v = taesd.get_variant(name)
    assert meta["taesd.normalization"] == v.normalization and words in meta["taesd.latent_convention"]
    assert "taesd.vae_scale" not in meta and "taesd.vae_shift" not in meta   # no false 1.0 / 0.0
    sd3 = metadata("taesd3", "decoder", False)
    assert float(sd3["taesd.vae_scale"]) == taesd.get_variant("taesd3").vae_scale


# ---------------------------------------------------------------- reading .pth files


class _RepeatDeflate:
    """A deflate stream of one block repeated: a 3 GiB record in ~3 MB, built in a few seconds."""
    def __init__(self):
        self.co, self.block = zlib.compressobj(9, zlib.DEFLATED, -15), None

    def compress(self, data):
        if self.block is None:
            self.block = self.co.compress(data) + self.co.flush(zlib.Z_FULL_FLUSH)
        return self.block

    def flush(self):
        return self.co.flush()


def _bomb(path: Path, gib: int = 3) -> None:
    buf = io.BytesIO()
    torch.save({"0.weight": torch.zeros(4)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w") as z:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                z.writestr(info, src.read(info.filename))
                continue
            record = zipfile.ZipInfo(info.filename)
            record.compress_type = zipfile.ZIP_DEFLATED
            with z.open(record, "w", force_zip64=True) as f:
                f._compressor = _RepeatDeflate()
                chunk = bytes(64 << 20)
                for _ in range(gib * 16):
                    f.write(chunk)


def test_a_decompression_bomb_pth_fails_fast_in_one_line_under_a_memory_limit(tmp_path):
    _bomb(tmp_path / "bomb.pth")
    assert (tmp_path / "bomb.pth").stat().st_size < 4 << 20
    with zipfile.ZipFile(tmp_path / "bomb.pth") as z:
        assert sum(i.file_size for i in z.infolist()) > 3 << 30
    code = ("import resource, sys, time; resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30)); "
            "from taesd.cli import main; t = time.monotonic(); rc = main(['info', sys.argv[1]]); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print(hwm, time.monotonic() - t); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bomb.pth")], env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "decompression bomb" in one_line(r.stderr) and float(r.stdout.split()[-1]) < 10
    # this child's own peak, VmHWM in KiB (ru_maxrss carries the parent's peak across fork + exec): < 1 GiB
    assert int(r.stdout.split()[-2]) < 1 << 20


def test_pth_whose_tensors_share_storage_reads_right_and_converts(tmp_path):
    sd = state_dicts(taesd.create("taesd", seed=2))["encoder"]
    flat = torch.cat([t.flatten() for t in sd.values()])
    shared, offset = {}, 0
    for k, t in sd.items():            # every tensor a view into one storage
        shared[k] = flat[offset:offset + t.numel()].view(t.shape)
        offset += t.numel()
    shared["1.conv.2.weight"] = shared["1.conv.0.weight"]   # tied: one tensor under two keys
    sd["1.conv.2.weight"] = sd["1.conv.0.weight"]
    torch.save(shared, tmp_path / "taesd_encoder.pth")
    src = read_source(tmp_path / "taesd_encoder.pth")
    assert all(torch.equal(src.parts["encoder"][k], sd[k]) for k in sd)
    assert main(["convert", str(tmp_path / "taesd_encoder.pth"), "--to", "safetensors", "--variant", "taesd",
                 "-o", str(tmp_path / "out")]) == 0
    back = load_file(tmp_path / "out" / "taesd_encoder.safetensors")
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_fp16_cast_that_would_overflow_is_refused_naming_the_tensor(tmp_path, capsys):
    parts = state_dicts(taesd.create("taesd", seed=3))
    parts["decoder"]["1.weight"][0, 0, 0, 0] = 1e5        # beyond fp16's 65504
    save_weights(parts, "taesd", "safetensors", tmp_path / "w")
    before = files_under(tmp_path)
    argv = ["convert", str(tmp_path / "w" / "taesd_encoder.safetensors"),
            str(tmp_path / "w" / "taesd_decoder.safetensors"), "--dtype", "fp16", "--to", "pth", "-o"]
    assert main([*argv, str(tmp_path / "o")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "decoder tensor '1.weight' holds values up to 1e+05" in err and "float16" in err
    assert files_under(tmp_path) == before
    parts["decoder"]["1.weight"][0, 0, 0, 0] = 1.0
    save_weights(parts, "taesd", "safetensors", tmp_path / "ok")
    assert main(["convert", str(tmp_path / "ok" / "taesd_decoder.safetensors"), "--dtype", "fp16", "--to", "pth",
                 "--variant", "taesd", "-o", str(tmp_path / "o")]) == 0
    assert torch.load(tmp_path / "o" / "taesd_decoder.pth", weights_only=True)["1.weight"].dtype == torch.float16


# ---------------------------------------------------------------- trust in the cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAESD_CACHE_DIR", str(tmp_path / "cache"))
    src = next(s for s in taesd.get_variant("taeqi2_1").sources if s.host == "github" and not s.sha256)
    return src


def _downloaded(src, data: bytes) -> Path:
    """A file as a verified download leaves it: in the cache, its hash recorded."""
    path = download.github_path(src)
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    download._record(path, download.sha256_of(path), download.url_of(src))
    return path


@pytest.mark.parametrize("record", ["deleted", "corrupt"])
def test_tampered_cache_with_its_record_removed_is_refused_not_retrusted(cache, record):
    path = _downloaded(cache, b"published bytes")
    assert download.cached(cache) == path
    records = download.weights_cache() / download.RECORDS
    path.write_bytes(b"tampered bytes!")
    with pytest.raises(TaesdError, match="hashes to .* recorded at the first download"):
        download.cached(cache)
    if record == "deleted":
        records.unlink()
    else:
        records.write_text("{not json")
    for _ in range(2):   # refused at every use: the failure records nothing
        with pytest.raises(TaesdError) as e:
            download.cached(cache)
        assert "no known hash" in str(e.value) and "refused" in str(e.value) and f"delete {path}" in str(e.value)
    assert (not records.exists()) if record == "deleted" else records.read_text() == "{not json"
    assert path.read_bytes() == b"tampered bytes!"


# ---------------------------------------------------------------- offline first run


def _silent_server() -> socket.socket:
    """Accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    return srv


def _refusing_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("how", ["refused", "silent", "offline"])
def test_first_run_without_network_fails_fast_naming_what_to_do(tmp_path, how):
    srv = _silent_server()
    url = f"http://127.0.0.1:{srv.getsockname()[1] if how == 'silent' else _refusing_port()}"
    env = {k: v for k, v in ENV.items() if k not in ("TAESD_WEIGHTS", "TAESD_OFFLINE", "HF_HUB_OFFLINE")}
    env.update(HF_ENDPOINT=url, TAESD_GITHUB_URL=url, TAESD_CACHE_DIR=str(tmp_path / "c"),
               HF_HUB_CACHE=str(tmp_path / "hf"), HF_HOME=str(tmp_path / "hfhome"))
    if how == "offline":
        env["TAESD_OFFLINE"] = "1"
    # timed inside the process: importing torch on a loaded machine is not what is measured
    code = ("import sys, time; from taesd.cli import main; t = time.monotonic(); rc = main(['download', 'taef2']); "
            "print(time.monotonic() - t); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    srv.close()
    assert r.returncode == 2 and "Retrying" not in r.stderr and "Traceback" not in r.stderr
    line = one_line(r.stderr)
    for words in ("taef2_encoder.pth", "TAESD_WEIGHTS", "--weights", "TAESD_OFFLINE"):
        assert words in line, (words, line)
    took = float(r.stdout.split()[-1])
    assert took < 15, took          # huggingface_hub's own retries alone take ~25 s
    assert not (tmp_path / "c").exists() or not any(p.is_file() for p in (tmp_path / "c").rglob("*"))


# ---------------------------------------------------------------- latent files and --variant


@pytest.mark.parametrize("made,asked", [("taesana", "taef2"), ("taef2", "taesana"), ("taesd3", "taef2")])
def test_variant_that_contradicts_a_latent_file_names_the_flag(tmp_path, made, asked):
    v = taesd.get_variant(made)
    path = taesd.save_latents(tmp_path / "z.safetensors", torch.zeros(1, v.latent_channels, 2, 2), made)
    with pytest.raises(TaesdError) as e:
        taesd.load_latents(path, asked)
    text = str(e.value)
    assert text.startswith(f"--variant {asked} contradicts") and f"holds {made} latents" in text
    assert "metadata is wrong" not in text and "remove it" not in text and "\n" not in text
    assert taesd.load_latents(path)[1].name == made


# ---------------------------------------------------------------- one resolver


def test_every_caller_uses_the_one_resolver():
    src = ROOT / "src" / "taesd"
    callers = {"cli/convert.py": "resolve(", "cli/info.py": "resolve(", "loader.py": "resolve(",
               "integrations/diffusers/layouts.py": "resolve(", "cli/download.py": "fetch_parts("}
    for rel, call in callers.items():
        text = (src / rel).read_text()
        assert "from taesd.io.weights" in text and call in text, rel
    # nothing else decides which file holds a part
    for path in src.rglob("*.py"):
        rel = path.relative_to(src).as_posix()
        text = path.read_text()
        if rel not in ("io/weights/resolve.py", "runtime/executors/__init__.py"):   # executors resolve a name
            assert not re.search(r"^def (resolve|find_weights)\(", text, re.M), rel
        if rel != "io/weights/download.py":
            assert "def fetch_parts(" not in text and "def sources_for(" not in text, rel
    for rel in ("io/weights/download.py", "io/weights/source.py", "cli/download.py"):
        assert "hashlib" not in (src / rel).read_text(), rel   # weight hashing lives in io/weights/read.py


def test_from_pretrained_hub_errors_reach_the_user_in_one_line(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from huggingface_hub import constants as hf_constants

    from taesd.integrations.diffusers.model import TaesdVAE
    for var in ("TAESD_WEIGHTS", "TAESD_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TAESD_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_refusing_port()}")
    with pytest.raises(TaesdError) as e:       # a repo outside the registry: its own hub error
        TaesdVAE.from_pretrained("someone/my-taef2", taesd_variant="taef2")
    text = str(e.value)
    assert "someone/my-taef2" in text and "cannot be reached" in text and "\n" not in text
    monkeypatch.setenv("TAESD_OFFLINE", "1")
    with pytest.raises(TaesdError) as e:       # a published repo: the one resolver, and what to do
        TaesdVAE.from_pretrained("madebyollin/taef2")
    text = str(e.value)
    assert text.startswith("no weights found for the taef2 encoder") and "TAESD_WEIGHTS" in text
    assert "\n" not in text and not any(p.is_file() for p in tmp_path.rglob("*"))
