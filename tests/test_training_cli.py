"""`taesd train` as a hostile user runs it: every bad option, bad data folder, bad checkpoint and
misused run folder ends with exit 2 and one line on stderr (no traceback), before anything is
created: a fresh --out is not made, an existing run folder is left byte for byte as it was. Plus
--help, and --overwrite starting a run over. Each case runs the real command in a subprocess."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from taesd.training.loop import CHECKPOINT, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ["astronaut", "coffee", "chelsea"]


def taesd_train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "taesd", "train", *args], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    import skimage.data
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        arr = np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr
        Image.fromarray(arr).resize((48, 48), Image.LANCZOS).save(folder / f"{name}.png")
    return folder


def base_args(photos: Path, out: Path, weights: Path) -> list[str]:
    return ["--data", str(photos), "--out", str(out), "--teacher", "taef2", "--teacher-weights", str(weights),
            "--student", "custom", "--width", "8", "--depth", "1", "--batch", "2", "--crop", "16",
            "--eval-crop", "32", "--steps", "2", "--cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def finished_run(photos, tmp_path_factory, weights) -> Path:
    """A finished 2-step run with the options of ``base_args``."""
    out = tmp_path_factory.mktemp("runs") / "done"
    train(TrainConfig(data=str(photos), out=str(out), teacher="taef2", teacher_weights=str(weights), width=8,
                      depth=1, batch=2, crop=16, eval_crop=32, steps=2, cpu=True, threads=1, progress=False))
    return out


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_failure(result: subprocess.CompletedProcess, expected: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("taesd train: error: "), result.stderr
    assert expected in lines[0], lines[0]


FRESH_FOLDER_CASES = [  # (extra options, what the one line must say); --out does not exist yet
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--eval-every", "0"], "--eval-every must be at least 1"),
    (["--ckpt-every", "-5"], "--ckpt-every must be at least 1"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--lr", "0"], "--lr must be above 0"),
    (["--ema", "1"], "--ema must be below 1"),
    (["--crop", "12"], "crop size 12 is not a multiple"),
    (["--final-crop", "20", "--final-steps", "1"], "crop size 20 is not a multiple"),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--resume"], "no checkpoint at"),
    (["--holdout", "MISSING"], "does not exist"),
    (["--teacher", "MISSING-FOLDER"], "does not exist"),
    (["--batch", "1000000000"], "--batch 1000000000 at crop 16 needs at least"),   # not a half-made run
]


@pytest.mark.parametrize("extra,expected", FRESH_FOLDER_CASES,
                         ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_bad_options_fail_before_the_run_folder_exists(photos, tmp_path, weights, extra, expected):
    out = tmp_path / "run"
    args = base_args(photos, out, weights) + extra
    if "MISSING" in extra:
        args[args.index("MISSING")] = str(tmp_path / "missing")
    if "MISSING-FOLDER" in extra:
        args[args.index("MISSING-FOLDER")] = str(tmp_path / "missing-vae")
    assert_one_line_failure(taesd_train(*args), expected)
    assert not out.exists()


def test_all_corrupt_data_fails_before_the_run_folder_exists(tmp_path, weights):
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (data / "empty.jpg").write_bytes(b"")
    (data / "text.webp").write_text("not an image")
    out = tmp_path / "run"
    assert_one_line_failure(taesd_train(*base_args(data, out, weights)), "none of the 3 images can be read")
    assert not out.exists()


def test_decompression_bomb_in_the_data_is_refused_like_any_input(tmp_path, weights):
    """The same pixel guard as the CLI's inputs: one line, no traceback, no run folder."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("1", (20000, 20000)).save(data / "bomb.png")          # 400 Mpx in 48 kB
    out = tmp_path / "run"
    result = taesd_train(*base_args(data, out, weights))
    assert_one_line_failure(result, "none of the 1 images can be read")
    assert "decompression bomb" in result.stderr and not out.exists()


def test_decompression_bomb_beside_good_images_is_skipped(photos, tmp_path, weights):
    data = tmp_path / "data"
    shutil.copytree(photos, data)
    Image.new("1", (20000, 20000)).save(data / "bomb.png")
    result = taesd_train(*base_args(data, tmp_path / "run", weights), "--steps", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def truncate(folder: Path) -> None:
    data = (folder / CHECKPOINT).read_bytes()
    (folder / CHECKPOINT).write_bytes(data[: len(data) // 3])


def zero(folder: Path) -> None:
    (folder / CHECKPOINT).write_bytes(bytes(4096))


def foreign_pickle(folder: Path) -> None:  # a pickle that a full (unsafe) load would have to execute
    torch.save({"step": 1, "config": Path(folder)}, folder / CHECKPOINT)


RUN_FOLDER_CASES = [  # (damage done to a copy of a finished run, extra options, the one line)
    (None, [], "holds a run (checkpoint.pt, metrics.csv, report.json); pass --resume to continue or "
               "--overwrite to start over"),
    (truncate, ["--resume"], "is truncated or corrupt"),
    (zero, ["--resume"], "is truncated or corrupt"),
    (foreign_pickle, ["--resume"], "holds Python objects a safe load refuses"),
    (None, ["--resume", "--width", "16"], "--width is 16 but the checkpoint"),
    (None, ["--resume", "--depth", "2"], "--depth is 2 but the checkpoint"),
    (None, ["--resume", "--student", "taef2"], "--student is 'taef2' but the checkpoint"),
    (None, ["--resume", "--parts", "decoder"], "--parts is 'decoder' but the checkpoint"),
    (None, ["--resume", "--disc-width", "32"], "--disc-width is 32 but the checkpoint"),
    (None, ["--resume", "--ema", "0.9"], "trained without --ema"),
    (None, ["--resume", "--adv-weight", "0"], "trained with --adv-weight"),
]


@pytest.mark.parametrize("damage,extra,expected", RUN_FOLDER_CASES,
                         ids=lambda x: " ".join(x) if isinstance(x, list) else getattr(x, "__name__", ""))
def test_a_run_folder_is_left_as_it_was(photos, finished_run, tmp_path, weights, damage, extra, expected):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    if damage is not None:
        damage(out)
    before = snapshot(out)
    assert_one_line_failure(taesd_train(*base_args(photos, out, weights), *extra), expected)
    assert snapshot(out) == before


def test_overwrite_starts_the_run_over_and_keeps_the_users_files(photos, finished_run, tmp_path, weights):
    from safetensors.torch import save_file
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "samples" / "step_000099.png").write_bytes(b"from the old run")
    mine = {"samples/notes.txt": b"my notes", "tensorboard/plot.png": b"my plot", "notes.md": b"mine"}
    for rel, data in mine.items():
        (out / rel).write_bytes(data)
    save_file({"w": torch.zeros(2)}, str(out / "student" / "taef2_decoder.safetensors"))   # no taesd marker
    (out / "student" / "mine.pth").write_bytes(b"my weights")
    before = snapshot(out)
    assert any(p.startswith("tensorboard/events.out.tfevents") for p in before)
    result = taesd_train(*base_args(photos, out, weights), "--overwrite", "--steps", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 1
    assert not (out / "samples" / "step_000099.png").exists()
    assert [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]] == ["0", "1"]
    after = snapshot(out)
    for rel in [*mine, "student/taef2_decoder.safetensors", "student/mine.pth"]:
        assert after[rel] == before[rel], rel
    old_events = {p for p in before if p.startswith("tensorboard/events")}
    assert not old_events & set(after)     # taesd's own event files went


def test_overwrite_refuses_a_folder_taesd_did_not_mark(photos, finished_run, tmp_path, weights):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / ".taesd-run").unlink()
    before = snapshot(out)
    assert_one_line_failure(taesd_train(*base_args(photos, out, weights), "--overwrite"),
                            "no .taesd-run marker")
    assert snapshot(out) == before


def test_help_works_and_shows_every_group():
    result = taesd_train("--help")
    assert result.returncode == 0, result.stderr
    for text in ("data:", "teacher and student:", "optimisation:", "losses:", "run:", "10%", "--overwrite",
                 "example:"):
        assert text in result.stdout, text
