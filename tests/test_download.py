"""Downloads over real HTTP (a loopback server standing in for the hub and GitHub): the first load
fetches and verifies, the second asks nothing; every bad response is refused with one line and
leaves no file in any cache; offline mode names the file to fetch and where to put it; the combined
hub layout loads and converts both ways."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants

import taesd
from conftest import ROOT
from loopback_hub import HUB_COMMIT, LoopbackHub, combined_taef2
from taesd.cli import main
from taesd.io.weights.formats import read_source, save_weights, state_dicts
from taesd.registry import TAESD_GITHUB_COMMIT

UNSET = ("TAESD_WEIGHTS", "HF_HUB_OFFLINE", "TAESD_OFFLINE")   # a user's machine: none of these set
PUBLISHED = {"encoder": "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
             "decoder": "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5"}


@pytest.fixture
def net(tmp_path, monkeypatch, weights):
    """The loopback hub + GitHub, and empty caches, for this process (HF constants set as the env would)."""
    hub = LoopbackHub(weights, TAESD_GITHUB_COMMIT).start()
    for var in UNSET:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("TAESD_GITHUB_URL", hub.url)
    monkeypatch.setenv("TAESD_CACHE_DIR", str(tmp_path / "taesd-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    # what huggingface_hub computed from HF_ENDPOINT at import: nothing may leave this machine
    monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    hub.caches = (tmp_path / "taesd-cache", tmp_path / "hf-cache")
    yield hub
    hub.stop()


def weight_requests(hub) -> list[tuple[str, str]]:
    """The requests for weight files (huggingface_hub also asks /api/agent-harnesses once a day)."""
    return [r for r in hub.requests if not r[1].startswith("/api/")]


def cached_files(hub) -> list[Path]:
    """Every file in both caches, but the Winograd kernel and the hub's CACHEDIR.TAG."""
    return sorted(p for root in hub.caches if root.exists() for p in root.rglob("*")
                  if (p.is_file() or p.is_symlink()) and "winograd" not in p.name)


def published(weights: Path) -> dict:
    return {p: read_source(weights / f"taef2_{p}.pth").parts[p] for p in ("encoder", "decoder")}


def same_weights(model, expected: dict) -> bool:
    got = state_dicts(model)
    return all(torch.equal(got[p][k].float(), expected[p][k].float()) for p in expected for k in expected[p])


def test_first_load_downloads_the_hub_combined_file_second_asks_nothing(net, weights):
    model = taesd.load("taef2", device="cpu", executor="plain")
    assert weight_requests(net) == [("HEAD", "/madebyollin/taef2/resolve/main/taef2.safetensors"),
                                    ("GET", "/madebyollin/taef2/resolve/main/taef2.safetensors")]
    info = model.weights_info
    assert info["encoder"]["format"] == info["decoder"]["format"] == "combined"
    assert f"snapshots/{HUB_COMMIT}/taef2.safetensors" in info["decoder"]["path"]
    assert same_weights(model, published(weights))          # the hub's keys mapped back exactly
    records = (net.caches[0] / "weights" / "sha256.json").read_text()
    assert info["decoder"]["sha256"] in records
    n = len(net.requests)
    again = taesd.load("taef2", device="cpu", executor="plain")
    assert len(net.requests) == n and again.weights_info == info


def test_github_source_pinned_commit_and_hashes(net, weights, capsys):
    model = taesd.load("taef2", device="cpu", source="github", executor="plain")
    for part, sha in PUBLISHED.items():
        assert model.weights_info[part]["sha256"] == sha
        assert f"weights/github/madebyollin/taesd/{TAESD_GITHUB_COMMIT}/taef2_{part}.pth" \
            in model.weights_info[part]["path"]
    # each file: the raw URL, then GitHub's redirect to raw.githubusercontent.com
    assert net.count("/raw/") == 2 and net.count("/raw.githubusercontent.com/") == 2
    n = len(net.requests)
    assert main(["download", "taef2", "--source", "github"]) == 0
    out = capsys.readouterr().out
    assert PUBLISHED["encoder"] in out and PUBLISHED["decoder"] in out and len(net.requests) == n
    # the GitHub files are the only home of the taesana decoder: the encoder comes from there too
    enc = taesd.load("taesana", device="cpu", parts="encoder")
    assert enc.weights_info["encoder"]["sha256"].startswith("858f4e4c")


def test_hub_diffusers_folder_with_config(net, tmp_path):
    save_weights(state_dicts(taesd.create("taesd", seed=3)), "taesd", "diffusers", tmp_path / "folder")
    net.add_diffusers_folder("madebyollin/taesd", tmp_path / "folder")
    model = taesd.load("taesd", device="cpu", executor="plain")
    assert model.weights_info["encoder"]["format"] == "diffusers"
    assert net.count("config.json") == 2 and net.count("diffusion_pytorch_model") == 2   # HEAD + GET each
    assert same_weights(model, state_dicts(taesd.create("taesd", seed=3)))


@pytest.mark.parametrize("host", ["hub", "github"])
@pytest.mark.parametrize("fault", ["truncate", "corrupt", "drop", "swap"])
def test_bad_responses_are_refused_and_leave_nothing(net, host, fault, weights):
    path = net.hub_path("madebyollin/taef2", "taef2.safetensors") if host == "hub" \
        else net.github_path("taef2_encoder.pth")
    # swap: well-formed bytes of the same length that are another file (the decoder's, cut to size)
    other = (weights / "taef2_decoder.pth").read_bytes()[:len(net.files[path])]
    net.faults[path] = other if fault == "swap" else fault
    with pytest.raises(taesd.TaesdError) as e:
        taesd.load("taef2", device="cpu", source=host)
    message = str(e.value)
    assert "\n" not in message and ("refused" in message or "failed" in message), message
    assert path.rsplit("/", 1)[1] in message
    assert cached_files(net) == [], cached_files(net)
    # the next try, with the server healed, downloads and verifies
    net.faults.clear()
    assert taesd.load("taef2", device="cpu", source=host).weights_info["encoder"]["sha256"]


def test_hub_download_resumes_after_one_dropped_connection(net, weights):
    path = net.hub_path("madebyollin/taef2", "taef2.safetensors")
    net.faults[path] = "drop_once"
    model = taesd.load("taef2", device="cpu", executor="plain")
    assert same_weights(model, published(weights))
    # the dropped one, then the rest (Range)
    assert [m for m, _ in weight_requests(net)] == ["HEAD", "GET", "GET"]


def test_a_cached_file_that_changed_is_refused(net):
    # An unpinned revision: no sha256 in the registry, so the first download records one.
    other = "f" * 40
    net.add_github("madebyollin/taesd", "taef2_decoder.pth",
                   net.files[net.github_path("taef2_decoder.pth")], commit=other)
    model = taesd.load("taef2", device="cpu", parts="decoder", source="github", revision=other)
    cached = Path(model.weights_info["decoder"]["path"])
    assert str(cached) in (net.caches[0] / "weights" / "sha256.json").read_text()
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 1
    cached.write_bytes(bytes(data))
    n = len(net.requests)
    expected = r"cached .* not 0a44a31e1ae59eb9.*recorded.*delete .*taef2_decoder.pth"
    with pytest.raises(taesd.TaesdError, match=expected):
        taesd.load("taef2", device="cpu", parts="decoder", source="github", revision=other)
    assert len(net.requests) == n


def test_offline_names_the_file_and_the_folder(net, monkeypatch, weights):
    monkeypatch.setenv("TAESD_OFFLINE", "1")
    with pytest.raises(taesd.TaesdError) as e:
        taesd.load("taef2", device="cpu")
    message = str(e.value)
    folder = net.caches[0] / "weights" / "github" / "madebyollin" / "taesd" / TAESD_GITHUB_COMMIT
    assert message.startswith("no weights found for the taef2 encoder: put taef2_encoder.pth (")
    assert f"{net.url}/madebyollin/taesd/raw/{TAESD_GITHUB_COMMIT}/taef2_encoder.pth" in message
    assert str(folder) in message and "TAESD_OFFLINE=1" in message and "\n" not in message
    assert net.requests == []
    # Doing what it says works, with no network and the file checked against the registry
    folder.mkdir(parents=True)
    for part in ("encoder", "decoder"):
        (folder / f"taef2_{part}.pth").write_bytes((weights / f"taef2_{part}.pth").read_bytes())
    assert taesd.load("taef2", device="cpu").weights_info["encoder"]["sha256"] == PUBLISHED["encoder"]


def test_cli_in_a_process_with_the_env_set(net, tmp_path):
    """HF_ENDPOINT/HF_HUB_OFFLINE as huggingface_hub reads them at import, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(HF_HUB_CACHE=str(net.caches[1]), PYTHONPATH=str(ROOT / "src"))
    cli = [sys.executable, "-m", "taesd"]
    r = subprocess.run([*cli, "download", "taef2"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    sha = read_source(next(net.caches[1].rglob("taef2.safetensors"))).sha256
    assert f"sha256 {sha}" in r.stdout and f"cached {net.caches[1]}" in r.stdout
    assert weight_requests(net) == [("HEAD", "/madebyollin/taef2/resolve/main/taef2.safetensors"),
                                    ("GET", "/madebyollin/taef2/resolve/main/taef2.safetensors")]
    n = len(net.requests)
    r = subprocess.run([*cli, "info", "--variant", "taef2"], env={**env, "HF_HUB_OFFLINE": "1"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "hub    madebyollin/taef2@main taef2.safetensors (combined: encoder+decoder)" in r.stdout
    assert f"cached {net.caches[1]}" in r.stdout and "not cached" in r.stdout
    assert PUBLISHED["decoder"] in r.stdout
    assert "32-channel encoder (taef2)" in r.stdout
    r = subprocess.run([*cli, "download", "taesana"], env={**env, "HF_HUB_OFFLINE": "1"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "taesana_encoder.pth" in r.stderr and "HF_HUB_OFFLINE=1" in r.stderr
    assert len(net.requests) == n


def test_convert_to_and_from_the_combined_layout(tmp_path, weights, capsys):
    assert main(["convert", str(weights / "taef2_encoder.pth"), str(weights / "taef2_decoder.pth"),
                 "--to", "combined", "-o", str(tmp_path / "taef2.safetensors")]) == 0
    from safetensors.torch import load, load_file
    ours, hubs = load_file(tmp_path / "taef2.safetensors"), load(combined_taef2(weights))
    assert ours.keys() == hubs.keys() and all(torch.equal(ours[k], hubs[k]) for k in ours)
    assert "decoder.layers.0.weight" in ours and "encoder.layers.0.weight" in ours   # no Clamp in diffusers
    assert read_source(tmp_path / "taef2.safetensors").format == "combined"
    combined = str(tmp_path / "taef2.safetensors")
    assert main(["convert", combined, "--to", "pth", "-o", str(tmp_path / "pth")]) == 0
    for part, sd in published(weights).items():
        back = torch.load(tmp_path / "pth" / f"taef2_{part}.pth", weights_only=True)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    encoder_only = str(weights / "taef2_encoder.pth")
    assert main(["convert", encoder_only, "--to", "combined", "-o", str(tmp_path / "x")]) == 2
    assert "holds both parts" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_run_sh_end_to_end_in_a_fresh_copy_downloads_taef2(net, tmp_path):
    """The README's main command on a machine without TAESD_WEIGHTS: taef2 comes from its hub layout,
    verified and cached; the second round trip of run.sh asks nothing more."""
    import shutil
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    (clone / ".venv").symlink_to(ROOT / ".venv")   # the checkout's venv, with the copy's code on the path
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(HF_ENDPOINT=net.url, TAESD_GITHUB_URL=net.url, HF_HUB_CACHE=str(net.caches[1]),
               TAESD_CACHE_DIR=str(net.caches[0]), PYTHONPATH=str(clone / "src"), TAESD_SETUP_REUSE_VENV="1")
    r = subprocess.run(["bash", "run.sh"], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((clone / "out" / "roundtrip").glob("*.png"))) == 5
    assert len(list((clone / "out" / "roundtrip-8bit").glob("*.png"))) >= 5
    assert weight_requests(net) == [("HEAD", "/madebyollin/taef2/resolve/main/taef2.safetensors"),
                                    ("GET", "/madebyollin/taef2/resolve/main/taef2.safetensors")]
    blob = next((net.caches[1] / "models--madebyollin--taef2" / "blobs").iterdir())
    import hashlib
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name   # verified against the ETag
    assert str(blob) in (net.caches[0] / "weights" / "sha256.json").read_text()
