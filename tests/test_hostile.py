"""Every CLI command tried as a hostile user would, run as a user runs it (``python -m taesd`` in a
subprocess, real photos, the published taef2 weights).

Each table row runs in a fresh copy of one work folder and asserts: the exit code; stderr has the
expected number of lines (one per failure), the expected words, and no "Traceback"; no hidden
temporary file is left anywhere; every file that was there before is byte-identical afterwards
(unless the row lets it change); exactly the expected new files appear. The classes are those of
issue 14: 1 outputs that would overwrite each other or the inputs, 2 one bad file in a batch,
5 failures that must be one line, 7 SIGTERM (separate tests), 8 file permissions (separate test).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------- the work folder

def _photo(name: str, h: int, w: int) -> np.ndarray:
    import skimage.data as data
    arr = getattr(data, name)()
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[:h, :w, :3])


@pytest.fixture(scope="module")
def base(tmp_path_factory, weights) -> Path:
    """photos/ (real photos, PNG and JPEG, in subfolders), bad/ (each kind of bad image),
    lat/ (good and malformed latent files), weights/ (a copy of the published taef2 files)."""
    from safetensors.torch import save_file

    import taesd
    root = tmp_path_factory.mktemp("hostile")
    photos = root / "photos"
    (photos / "a").mkdir(parents=True)
    (photos / "b").mkdir()
    Image.fromarray(_photo("astronaut", 64, 64)).save(photos / "a" / "x.png")
    Image.fromarray(_photo("coffee", 48, 64)).save(photos / "b" / "x.png")          # same name, other folder
    Image.fromarray(_photo("chelsea", 40, 56)).save(photos / "photo.v2.png")        # dots in the stem
    Image.fromarray(_photo("camera", 64, 48)).save(photos / "cam.jpg", quality=90)
    bad = root / "bad"
    bad.mkdir()
    Image.fromarray(_photo("astronaut", 64, 64)).save(bad / "good.png")
    Image.fromarray(_photo("astronaut", 8, 8)).save(bad / "tiny.png")              # below SSIM's 11x11
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    (bad / "empty.png").write_bytes(b"")
    Image.new("1", (20000, 20000)).save(root / "bomb.png")                          # 400 Mpx in 48 kB
    Image.fromarray(_photo("astronaut", 64, 64)).save(root / "same.png")
    Image.fromarray(_photo("coffee", 64, 64)).save(root / "same.jpg")               # same stem as same.png
    lat = root / "lat"
    lat.mkdir()
    model = taesd.load("taef2", weights, device="cpu")
    image = torch.from_numpy(_photo("astronaut", 64, 64)).permute(2, 0, 1).float() / 255
    latents = model.encode(image[None])
    taesd.save_latents(lat / "good.taef2.safetensors", latents, "taef2", (64, 64))
    taesd.save_latents(lat / "good8.taef2.png", latents[0], "taef2", (64, 64))
    Image.fromarray(_photo("coffee", 32, 32)).save(lat / "photo.png")               # no latent PNG
    bad_lat = root / "badlat"
    bad_lat.mkdir()
    z = latents.detach().contiguous()
    for name, size in (("size", "abc"), ("size2", "[1]")):
        save_file({"latents": z}, str(bad_lat / f"{name}.safetensors"),
                  metadata={"variant": "taef2", "image_size": size})
    save_file({"latents": torch.zeros(1, 32, 0, 0)}, str(bad_lat / "empty.safetensors"),
              metadata={"variant": "taef2"})
    info = PngImagePlugin.PngInfo()
    info.add_text("taesd_variant", "taef2")
    info.add_text("taesd_image_size", "{not json")
    Image.open(lat / "good8.taef2.png").save(bad_lat / "meta.png", pnginfo=info)
    w = root / "weights"
    w.mkdir()
    for part in ("encoder", "decoder"):
        shutil.copy(weights / f"taef2_{part}.pth", w)
    (root / "afile").write_text("a file, not a folder\n")
    (root / "taken.taef2.safetensors").mkdir()                          # an output name that is a folder
    (root / "taken.png").write_bytes((photos / "a" / "x.png").read_bytes())
    return root


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def temp_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".*.tmp*")]


def taesd_cli(argv, cwd: Path, env=None, preexec=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taesd", *argv], cwd=cwd, capture_output=True, text=True,
                          env={**ENV, "TAESD_WEIGHTS": str(cwd / "weights"), **(env or {})},
                          preexec_fn=preexec, timeout=timeout)


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /tmp"],
                       capture_output=True)
    return r.returncode == 0


MOUNT = _can_mount()


def mounted(kind: str, folder: str):
    """argv prefix: run inside a private mount namespace where ``folder`` is a tmpfs that is full
    (4 kB) or read-only; the rest of the machine is untouched."""
    opts = "size=4k" if kind == "full" else "ro"
    return ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o {opts} tmpfs {folder} && exec "$@"', "sh"]


# ---------------------------------------------------------------- the table

E = ["-v", "taef2"]
CUDA = torch.cuda.is_available()


def _setup_out_dir(root: Path):
    (root / "res").mkdir()
    (root / "res" / "eval.csv").write_text("earlier results\n")


def _setup_onnx(root: Path):
    (root / "onnx").mkdir()
    (root / "onnx" / "taef2_decoder.onnx").write_bytes(b"an earlier export")


def _setup_mount_dirs(root: Path):
    (root / "full").mkdir()
    (root / "ro").mkdir()


def _setup_rerun(root: Path):
    """What a first `roundtrip photos/` and `encode photos/ --format png` left beside the inputs
    (taesd's files: they carry its marker)."""
    import taesd
    image = taesd.load_image(root / "bad" / "good.png")
    for rel in ("a/x", "b/x", "photo.v2", "cam"):
        taesd.save_image(image, root / "photos" / f"{rel}.taef2.roundtrip.png")
        shutil.copy(root / "lat" / "good8.taef2.png", root / "photos" / f"{rel}.taef2.png")


def _setup_user_file_with_an_output_name(root: Path):
    _setup_rerun(root)
    shutil.copy(root / "bad" / "good.png", root / "photos" / "cam.taef2.roundtrip.png")   # the user's own


def _setup_wide_latents(root: Path):
    import taesd
    taesd.save_latents(root / "wide.taef2.safetensors", torch.zeros(1, 32, 2, 2059), "taef2", (16, 16470))


@dataclasses.dataclass
class Case:
    id: str
    argv: list
    rc: int
    words: tuple = ()          # each must appear in stderr
    lines: int | None = None   # stderr lines (default: 1 on failure, 0 on success)
    new: tuple = ()            # files (relative) that must appear; no others may
    setup: Callable | None = None
    changes: tuple = ()        # files that must be rewritten; every other file stays byte-identical
    env: dict | None = None
    mount: bool = False        # argv starts with a `mounted(...)` prefix
    fsize: int | None = None   # RLIMIT_FSIZE for the run
    skip: bool = False


ROUNDTRIPS = tuple(f"photos/{r}.taef2.roundtrip.png" for r in ("a/x", "b/x", "photo.v2", "cam"))
FULL, RO = mounted("full", "full"), mounted("ro", "ro")
TAESD = [sys.executable, "-m", "taesd"]

CASES = [
    # ---- class 1: outputs never collide, never land on inputs, existing ones are not replaced silently
    Case("encode-folder-keeps-subfolders-and-full-stem", ["encode", "photos", *E, "-o", "out"], 0,
         new=("out/a/x.taef2.safetensors", "out/b/x.taef2.safetensors", "out/photo.v2.taef2.safetensors",
              "out/cam.taef2.safetensors")),
    Case("encode-beside-inputs", ["encode", "photos", *E, "--format", "png"], 0,
         new=("photos/a/x.taef2.png", "photos/b/x.taef2.png", "photos/photo.v2.taef2.png",
              "photos/cam.taef2.png")),
    Case("encode-same-stem-refused", ["encode", "same.png", "same.jpg", *E], 2, ("would both write",)),
    Case("encode-same-name-two-folders-flat-o-refused",
         ["encode", "photos/a/x.png", "photos/b/x.png", *E, "-o", "o"], 2,
         ("would both write", "o/x.taef2.safetensors")),
    Case("rerun-skips-own-outputs", ["roundtrip", "photos", *E, "--skip-existing"], 0,
         ("skipped 8 file(s) that taesd wrote", "skipped 4 input(s) whose output exists"), 2,
         setup=_setup_rerun),
    Case("rerun-refuses-existing", ["roundtrip", "photos", *E], 2, ("exists (and 3 more)", "--overwrite"), 2,
         setup=_setup_rerun),
    Case("rerun-overwrite-replaces-not-results-of-results", ["roundtrip", "photos", *E, "--overwrite"], 0,
         ("skipped 8",), 1, setup=_setup_rerun, changes=ROUNDTRIPS),
    Case("overwrite-spares-a-file-taesd-did-not-write", ["roundtrip", "photos", *E, "--overwrite"], 2,
         ("photos/cam.taef2.roundtrip.png exists and was not written by taesd", "--overwrite replaces only"),
         2, setup=_setup_user_file_with_an_output_name),
    Case("encode-onto-input", ["encode", "taken.png", *E, "--format", "png", "-o", "taken.png"], 2,
         ("a file this run reads",)),
    Case("encode-onto-input-even-with-overwrite",
         ["encode", "taken.png", *E, "--format", "png", "-o", "taken.png", "--overwrite"], 2,
         ("a file this run reads",)),
    Case("roundtrip-onto-input", ["roundtrip", "taken.png", *E, "-o", "taken.png"], 2,
         ("a file this run reads",)),
    Case("decode-onto-input", ["decode", "lat/good8.taef2.png", "-o", "lat/good8.taef2.png"], 2,
         ("a file this run reads",)),
    Case("decode-onto-weights",
         ["decode", "lat/good8.taef2.png", "-w", "weights/taef2_decoder.pth",
          "-o", "weights/taef2_decoder.pth"],
         2, ("a file this run reads",)),
    Case("convert-onto-the-folder-it-reads", ["convert", "taef2", "--to", "pth", "-o", "weights"], 2,
         ("one of the files being converted", "nothing was written")),
    Case("convert-files-onto-their-folder",
         ["convert", "weights/taef2_encoder.pth", "weights/taef2_decoder.pth", "--to", "pth", "-o", "weights",
          "--overwrite"], 2, ("one of the files being converted",)),
    Case("convert-existing-refused", ["convert", "taef2", "--to", "pth", "-o", "cv"], 2,
         ("cv/taef2_encoder.pth exists",), setup=lambda r: shutil.copytree(r / "weights", r / "cv")),
    Case("convert-existing-overwrite",
         ["convert", "taef2", "--to", "safetensors", "-o", "cv", "--overwrite"], 0,
         new=("cv/taef2_encoder.safetensors", "cv/taef2_decoder.safetensors")),
    Case("export-existing-refused", ["export", "onnx", *E, "-o", "onnx"], 2,
         ("onnx/taef2_decoder.onnx exists",),
         setup=_setup_onnx),
    Case("eval-existing-results-refused", ["eval", "photos", *E, "-o", "res"], 2, ("res/eval.csv exists",),
         setup=_setup_out_dir),
    # ---- class 2: one bad file does not stop a batch; every failure one line, exit 2
    Case("encode-batch-goes-on", ["encode", "bad", "bomb.png", *E, "-o", "out"], 2,
         ("bad/corrupt.png", "bad/empty.png", "bomb.png: ", "decompression bomb", "3 of 5 inputs failed"), 4,
         new=("out/good.taef2.safetensors", "out/tiny.taef2.safetensors")),
    Case("encode-batch-fail-fast", ["encode", "bad", *E, "-o", "out", "--fail-fast"], 2,
         ("bad/corrupt.png",)),
    Case("roundtrip-batch-goes-on", ["roundtrip", "bad", *E, "-o", "out"], 2,
         ("bad/corrupt.png", "bad/empty.png", "tiny.png: the image is 8x8 pixels; SSIM needs at least 11x11",
          "3 of 4 inputs failed"), 4, new=("out/good.taef2.roundtrip.png",)),
    Case("eval-batch-goes-on", ["eval", "bad", *E, "-o", "res"], 2,
         ("bad/corrupt.png", "bad/empty.png", "SSIM needs", "3 of 4 inputs failed"), 4,
         new=("res/eval.csv", "res/eval.json", "res/grid.png")),
    Case("decode-checks-every-input-first", ["decode", "lat", "badlat", "-o", "out"], 2,
         ("lat/photo.png", "badlat/size.safetensors", "badlat/size2.safetensors", "badlat/empty.safetensors",
          "badlat/meta.png", "5 of 7 inputs failed; nothing was decoded"), 6),
    Case("decode-two-files", ["decode", "lat/good.taef2.safetensors", "lat/good8.taef2.png", "-o", "out"], 0,
         new=("out/good.decoded.png", "out/good8.decoded.png")),
    # ---- class 5: one line, exit 2, no partial output
    Case("encode-unknown-device", ["encode", "taken.png", *E, "--device", "tpu9"], 2, ("device 'tpu9'",)),
    Case("decode-cuda-missing", ["decode", "lat/good8.taef2.png", "-o", "o.png", "--device", "cuda"], 2,
         ("--device cuda", "--device cpu"), skip=CUDA),
    Case("roundtrip-cuda-index-missing", ["roundtrip", "taken.png", *E, "--device", "cuda:7"], 2,
         ("--device cuda:7",)),
    Case("eval-cuda-missing", ["eval", "photos", *E, "--device", "cuda"], 2, ("--device cuda",), skip=CUDA),
    Case("encode-bad-memory-budget", ["encode", "photos", *E, "--max-memory", "a lot", "-o", "out"], 2,
         ("memory size",)),
    Case("encode-zero-memory-budget", ["encode", "photos", *E, "--max-memory", "0GiB", "-o", "out"], 2,
         ("--max-memory 0GiB: a budget of nothing",)),
    Case("roundtrip-zero-tile-size", ["roundtrip", "photos", *E, "--tile-size", "0"], 2, ("--tile-size",)),
    Case("encode-output-under-a-file", ["encode", "taken.png", *E, "-o", "afile/x.taef2.safetensors"], 2,
         ("afile is a file, not a folder",)),
    Case("encode-output-is-a-folder", ["encode", "taken.png", *E], 2,
         ("taken.taef2.safetensors: it is a folder",)),
    Case("convert-output-under-a-file", ["convert", "taef2", "--to", "safetensors", "-o", "afile/w"], 2,
         ("afile",)),
    Case("export-output-under-a-file", ["export", "onnx", *E, "-o", "afile/onnx"], 2, ("afile is a file",)),
    Case("eval-output-under-a-file", ["eval", "photos", *E, "-o", "afile"], 2, ("afile is a file",)),
    Case("encode-decompression-bomb", ["encode", "bomb.png", *E], 2,
         ("decompression bomb", "TAESD_MAX_IMAGE_PIXELS")),
    Case("pixel-limit-is-the-limit-set", ["encode", "taken.png", *E, "-o", "o.safetensors"], 2,
         ("4096 pixels is over TAESD_MAX_IMAGE_PIXELS=3000",),
         env={"TAESD_MAX_IMAGE_PIXELS": "3000"}),   # 64 x 64 = 4096 px: over 3000 (PIL alone: under 2 x 3000)
    Case("roundtrip-too-wide-for-webp", ["roundtrip", "wide.png", *E, "-o", "wide.webp"], 2,
         ("cannot write wide.webp: WEBP images are at most 16383 pixels a side", "as .png"),
         setup=lambda r: Image.new("RGB", (16400, 16)).save(r / "wide.png")),
    Case("decode-too-wide-found-before-decoding", ["decode", "wide.taef2.safetensors", "-o", "w.webp"], 2,
         ("cannot write w.webp", "16470x16"), setup=_setup_wide_latents),
    Case("bad-pixel-limit", ["encode", "taken.png", *E, "-o", "o.safetensors"], 2,
         ("TAESD_MAX_IMAGE_PIXELS must be a whole number",), env={"TAESD_MAX_IMAGE_PIXELS": "lots"}),
    Case("roundtrip-too-small-for-ssim", ["roundtrip", "bad/tiny.png", *E, "-o", "rt.png"], 2,
         ("SSIM needs",)),
    Case("roundtrip-empty-image", ["roundtrip", "bad/empty.png", *E], 2, ("is empty",)),
    Case("decode-malformed-metadata", ["decode", "badlat/size.safetensors"], 2, ("malformed",)),
    Case("decode-malformed-png-metadata", ["decode", "badlat/meta.png"], 2, ("badlat/meta.png",)),
    Case("decode-empty-latents", ["decode", "badlat/empty.safetensors"], 2, ("empty",)),
    Case("info-a-photo", ["info", "taken.png"], 0),   # described as an image (test_info_images)
    Case("info-folder", ["info", "photos"], 2, ("photos",)),
    Case("info-fake-onnx", ["info", "bad/corrupt.onnx"], 2, ("corrupt.onnx",),
         setup=lambda r: shutil.copy(r / "bad" / "corrupt.png", r / "bad" / "corrupt.onnx")),
    Case("export-bad-opset", ["export", "onnx", *E, "-o", "onnx2", "--opset", "3"], 2, ("opset",)),
    Case("roundtrip-full-disk", [*FULL, *TAESD, "roundtrip", "taken.png", *E, "-o", "full/rt.png"], 2,
         ("cannot write full/rt.png: the disk is full",), setup=_setup_mount_dirs, mount=True,
         skip=not MOUNT),
    Case("convert-full-disk", [*FULL, *TAESD, "convert", "taef2", "--to", "safetensors", "-o", "full/w"], 2,
         ("the disk is full",), setup=_setup_mount_dirs, mount=True, skip=not MOUNT),
    Case("encode-read-only-disk", [*RO, *TAESD, "encode", "photos", *E, "-o", "ro/lat"], 2,
         ("cannot write ro/lat", "read-only"), 1, setup=_setup_mount_dirs, mount=True, skip=not MOUNT),
    Case("export-read-only-disk", [*RO, *TAESD, "export", "onnx", *E, "--part", "decoder", "-o", "ro"], 2,
         ("cannot write ro/taef2_decoder.onnx", "read-only"), setup=_setup_mount_dirs, mount=True,
         skip=not MOUNT),
    Case("encode-file-size-limit", ["encode", "taken.png", *E, "-o", "big.safetensors"], 2,
         ("cannot write big.safetensors", "too large"), fsize=4000),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_cli(case: Case, base, tmp_path):
    if case.skip:
        pytest.skip("needs a machine without CUDA" if "cuda" in case.id
                    else "needs unshare and mount namespaces")
    work = tmp_path / "w"
    shutil.copytree(base, work, symlinks=True)
    if case.setup:
        case.setup(work)
    before = snapshot(work)
    if case.mount:
        r = subprocess.run(case.argv, cwd=work, capture_output=True, text=True, timeout=300,
                           env={**ENV, "TAESD_WEIGHTS": str(work / "weights")})
        command = case.argv[case.argv.index("taesd") + 1]
    else:
        preexec = None
        if case.fsize:
            preexec = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (case.fsize, case.fsize))  # noqa: E731
        r = taesd_cli(case.argv, work, case.env, preexec)
        command = case.argv[0]
    err = r.stderr.strip().splitlines()
    assert r.returncode == case.rc, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(err) == (case.lines if case.lines is not None else int(case.rc != 0)), err
    for w in case.words:
        assert w in r.stderr, (w, err)
    assert all(line.startswith(f"taesd {command}:") for line in err), err
    assert temp_files(work) == []
    after = snapshot(work)
    for path, digest in before.items():
        assert path in after, f"{path} was removed"
        if path not in case.changes:
            assert after[path] == digest, f"{path} was changed"
    for path in case.changes:
        assert after[path] != before[path], f"{path} was not rewritten"
    assert set(after) - set(before) == set(case.new)


def test_rerun_over_a_folder_takes_no_outputs_for_inputs(base, tmp_path):
    """Two runs over the same folder: the second takes only the photos (not the first run's latent
    PNGs or round trips) and, with --overwrite, writes the same files again: no results of results."""
    work = tmp_path / "w"
    shutil.copytree(base, work)
    first = taesd_cli(["roundtrip", "photos", *E], work)
    assert first.returncode == 0, first.stderr
    assert taesd_cli(["encode", "photos", *E, "--format", "png"], work).returncode == 0
    made = snapshot(work)
    second = taesd_cli(["roundtrip", "photos", *E, "--overwrite"], work)
    assert second.returncode == 0, second.stderr
    assert "skipped 8 file(s) that taesd wrote" in second.stderr
    assert set(snapshot(work)) == set(made)           # no x.taef2.roundtrip.taef2.roundtrip.png
    assert not list(work.rglob("*.roundtrip.*.roundtrip*")) and not list(work.rglob("*.taef2.taef2.*"))
    assert second.stdout.count("PSNR") == first.stdout.count("PSNR") == 4 + 1   # 4 images + the mean


# ---------------------------------------------------------------- no clobber at the moment of writing

def test_a_file_planted_between_plan_and_write_is_never_replaced(base, tmp_path, monkeypatch):
    """The output did not exist when the batch was planned; another program makes it before taesd
    writes: taesd's write fails in one line (exit 2), the other file stays byte for byte."""
    import taesd.cli.common as common
    from taesd.cli import main
    work = tmp_path / "w"
    shutil.copytree(base, work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("TAESD_WEIGHTS", str(work / "weights"))
    plan = common.plan_outputs

    def plan_then_plant(*args, **kwargs):
        jobs = plan(*args, **kwargs)
        (work / "o.safetensors").write_bytes(b"another program's file")
        return jobs

    monkeypatch.setattr(common, "plan_outputs", plan_then_plant)
    assert main(["encode", "taken.png", *E, "-o", "o.safetensors"]) == 2
    assert (work / "o.safetensors").read_bytes() == b"another program's file"
    assert temp_files(work) == []


def test_two_processes_writing_one_output_one_wins(base, tmp_path):
    """A real race: two processes encode onto the same output name at once. Exactly one succeeds; the
    other exits 2 with one line (refused when it planned, or when it wrote), never replacing the file."""
    work = tmp_path / "w"
    shutil.copytree(base, work)
    env = {**ENV, "TAESD_WEIGHTS": str(work / "weights")}
    argv = [*TAESD, "encode", "taken.png", *E, "-o", "same.taef2.safetensors"]
    procs = [subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert len(loser.strip().splitlines()) == 1 and "Traceback" not in loser, loser
    assert "appeared while taesd was writing it" in loser or "exists" in loser, loser
    assert (work / "same.taef2.safetensors").is_file() and temp_files(work) == []


def test_publish_without_overwrite_never_replaces(tmp_path):
    from taesd.errors import TaesdError
    from taesd.io.files import atomic_path, output_policy
    (tmp_path / "x.png").write_bytes(b"theirs")
    with output_policy(False), pytest.raises(TaesdError, match="appeared while taesd was writing"):
        with atomic_path(tmp_path / "x.png") as tmp:
            tmp.write_bytes(b"ours")
    assert (tmp_path / "x.png").read_bytes() == b"theirs" and sorted(os.listdir(tmp_path)) == ["x.png"]
    with output_policy(True), pytest.raises(TaesdError, match="not written by taesd"):   # no marker
        with atomic_path(tmp_path / "x.png") as tmp:
            tmp.write_bytes(b"ours")
    assert (tmp_path / "x.png").read_bytes() == b"theirs" and sorted(os.listdir(tmp_path)) == ["x.png"]
    (tmp_path / "eval.csv").write_text("earlier")   # a format with no room for a marker: taesd's by name
    with output_policy(True):
        with atomic_path(tmp_path / "eval.csv") as tmp:
            tmp.write_text("new")
    assert (tmp_path / "eval.csv").read_text() == "new"


# ---------------------------------------------------------------- class 7: SIGTERM

def _wait_for(pred, timeout: float, interval: float = 0.001):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = pred()
        if found:
            return found
        time.sleep(interval)
    return None


def test_sigterm_during_a_tiled_encode_leaves_nothing(base, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(base, work)
    big = np.tile(_photo("astronaut", 512, 512), (2, 2, 1))                       # 1024 x 1024
    Image.fromarray(big).save(work / "big.png")
    before = snapshot(work)
    proc = subprocess.Popen([sys.executable, "-m", "taesd", "encode", "big.png", *E, "--tile-size", "8",
                             "-o", "big.taef2.safetensors"], cwd=work, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "TAESD_WEIGHTS": str(work / "weights")})
    time.sleep(6)   # the model is loaded and the (slow, tiny-tile) encode is under way
    assert proc.poll() is None, "the encode finished before the signal; make the image bigger"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["taesd encode: terminated (SIGTERM)"], err
    assert temp_files(work) == [] and snapshot(work) == before


def test_sigterm_mid_write_removes_the_temporary_file(base, tmp_path):
    """Kill the moment the hidden temporary file of a large PNG exists (PIL writes it in chunks)."""
    import taesd
    work = tmp_path / "w"
    shutil.copytree(base, work)
    noise = torch.empty(1, 32, 160, 160).uniform_(-3, 3, generator=torch.Generator().manual_seed(0))
    taesd.save_latents(work / "noise.taef2.safetensors", noise, "taef2")        # -> 1280 x 1280 of noise
    proc = subprocess.Popen([*TAESD, "decode", "noise.taef2.safetensors", "-o", "n.png"],
                            cwd=work, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "TAESD_WEIGHTS": str(work / "weights")})
    seen = _wait_for(lambda: temp_files(work), timeout=240)
    if seen:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert seen, f"no temporary file appeared (rc {proc.returncode}: {err})"
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "taesd decode: terminated (SIGTERM)"
    assert temp_files(work) == []
    assert not (work / "n.png").exists()


def test_main_restores_the_sigterm_handler():
    from taesd.cli import main
    before = signal.getsignal(signal.SIGTERM)
    assert main(["info"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------- class 8: permissions

@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_outputs_get_the_usual_permissions(base, tmp_path, umask):
    """Every file written is 0666 & ~umask, as any other program's (world-readable under 022)."""
    work = tmp_path / "w"
    shutil.copytree(base, work)
    before = set(snapshot(work))
    set_umask = lambda: os.umask(umask)  # noqa: E731
    for argv in (["encode", "photos", *E, "-o", "latents"], ["decode", "latents", "-o", "dec"],
                 ["roundtrip", "taken.png", *E], ["convert", "taef2", "--to", "safetensors", "-o", "cv"],
                 ["eval", "photos/a", *E, "-o", "res"]):
        r = taesd_cli(argv, work, preexec=set_umask)
        assert r.returncode == 0, (argv, r.stderr)
    new = sorted(set(snapshot(work)) - before)
    assert len(new) == 4 + 4 + 1 + 2 + 3, new
    modes = {p: (work / p).stat().st_mode & 0o777 for p in new}
    assert set(modes.values()) == {0o666 & ~umask}, modes
    if umask == 0o022:
        assert all(m & 0o004 for m in modes.values())    # other accounts can read them


# ---------------------------------------------------------------- the pieces, in process

def test_an_interrupt_the_moment_the_temporary_file_exists_leaves_nothing(tmp_path):
    """A SIGTERM that one of PyTorch's threads takes raises in the main thread at the next bytecode,
    even while the main thread holds the signals back: right after the file is created. The name is
    known before the file exists, so the cleanup still removes it (mkstemp's name was not)."""
    from taesd.io import files
    real_open = os.open

    def open_then_interrupt(name, flags, mode=0o777):
        os.close(real_open(name, flags, mode))
        raise KeyboardInterrupt
    files.os.open = open_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            with files.atomic_path(tmp_path / "out.png"):
                pass
    finally:
        files.os.open = real_open
    assert list(tmp_path.iterdir()) == []


def test_deferred_renames_all_or_nothing(tmp_path):
    from taesd.errors import TaesdError
    from taesd.io.files import atomic_path, deferred_renames

    def refuse(targets):
        raise TaesdError(f"no: {len(targets)}")

    with pytest.raises(TaesdError, match="no: 2"):
        with deferred_renames(refuse):
            for name in ("a.txt", "b.txt"):
                with atomic_path(tmp_path / name) as tmp:
                    tmp.write_text(name)
    assert list(tmp_path.iterdir()) == []
    with deferred_renames():
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("a")
        assert list(tmp_path.iterdir())[0].name.startswith(".a.txt.")   # not renamed yet
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    with pytest.raises(TaesdError, match="written twice"):
        with deferred_renames():
            for _ in range(2):
                with atomic_path(tmp_path / "c.txt") as tmp:
                    tmp.write_text("c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_outputs_are_recognised_by_name_and_by_marker(tmp_path):
    import taesd
    from taesd.io.inputs import IMAGE_SUFFIXES, collect_inputs
    img = Image.fromarray(_photo("astronaut", 16, 16))
    for name in ("p.png", "p.v2.png", "p.taef2.png", "p.taesdxl.roundtrip.png", "p.decoded.png",
                 "p.3.decoded.png", "q.jpg", "grid.png", "eval.json"):
        if name.endswith(".json"):
            (tmp_path / name).write_text("{}")
        else:
            img.save(tmp_path / name)
    taesd.save_latents(tmp_path / "renamed.png", torch.zeros(32, 2, 2), "taef2")   # latent PNG, any name
    found, skipped = collect_inputs([tmp_path], IMAGE_SUFFIXES, "image")
    assert sorted(f.path.name for f in found) == ["p.png", "p.v2.png", "q.jpg"]
    assert sorted(p.name for p in skipped) == ["grid.png", "p.3.decoded.png", "p.decoded.png", "p.taef2.png",
                                               "p.taesdxl.roundtrip.png", "renamed.png"]
    named, _ = collect_inputs([tmp_path / "p.taef2.png", tmp_path, tmp_path / "p.png"], IMAGE_SUFFIXES)
    assert named[0].path.name == "p.taef2.png" and len(named) == 4      # named directly: taken; no duplicates
