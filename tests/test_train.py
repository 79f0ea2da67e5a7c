"""Training: loss goes down, corrupt files are skipped, Ctrl-C + --resume is bit-identical, two
CPU processes under accelerate stay identical, a registry student loads with taesd.load, and a
diffusers teacher trains through the latent cache. Real taef2 teacher, real photos, tiny crops."""
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import taesd
from conftest import require_weights
from taesd.training.loop import CHECKPOINT, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera"]


def write_photos(folder: Path, size: int = 96) -> Path:
    import skimage.data
    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        Image.fromarray(arr).resize((size, size), Image.LANCZOS).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos"))


def tiny(out, data, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), teacher="taef2",
                teacher_weights=str(require_weights()),
                student="custom", width=16, depth=1, batch=4, crop=16, eval_crop=32, steps=4, lr=1e-3,
                log_every=1, eval_every=1000, ckpt_every=1000, cpu=True, threads=1, progress=False, seed=3)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def short_run(photos, tmp_path_factory, weights):
    """40 steps with a corrupt and an empty file among the photos."""
    data = tmp_path_factory.mktemp("data")
    for f in photos.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (data / "empty.jpg").write_bytes(b"")
    out = tmp_path_factory.mktemp("short")
    report = train(tiny(out, data, steps=40, decoder_target="teacher", adv_weight=0.05, adv_start=20))
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss_rec")]
    return out, report, rows


def test_short_run_loss_decreases(short_run):
    out, report, rows = short_run
    assert report["step"] == 40 and not report["stopped_early"]
    for key in ("loss_rec", "loss_latent"):
        values = [float(r[key]) for r in rows]
        assert np.mean(values[-8:]) < 0.8 * np.mean(values[:8]), (key, values)
    assert any(r.get("loss_d") for r in rows[25:])  # the discriminator trained after adv_start
    assert (out / "learning_curve.png").is_file() and list((out / "samples").glob("step_*.png"))
    assert any((out / "tensorboard").iterdir())


def test_corrupt_images_are_skipped_and_counted(short_run):
    out, report, rows = short_run
    assert sorted(Path(p).name for p in report["skipped_files"]) == ["broken.png", "empty.jpg"]
    assert rows[-1]["skipped_files"] == "2"


def test_custom_student_saves_and_reloads(short_run, photos):
    from taesd.training.students import load_student
    out, _, _ = short_run
    student = load_student(out / "student")
    assert student.config["width"] == 16 and student.parts == ("encoder", "decoder")
    ck = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
    for k, t in student.state_dict().items():
        assert torch.equal(t, ck["student"][k])


def _interrupt_at(n):
    def callback(step, losses):
        if step == n:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does: the handler asks for a stop
    return callback


def test_resume_is_bit_identical_and_student_loads(photos, tmp_path):
    # A registry student (taef2's architecture), EMA and the adversarial term: everything resumes.
    kw = dict(student="taef2", steps=6, batch=2, ema=0.9, adv_weight=0.1, ckpt_every=2, colour_aug=0.5)
    straight = train(tiny(tmp_path / "a", photos, **kw))
    first = train(tiny(tmp_path / "b", photos, **kw), callback=_interrupt_at(3))
    assert first["stopped_early"] and first["step"] == 3
    second = train(tiny(tmp_path / "b", photos, resume=True, **kw))
    assert second["step"] == 6 and not second["stopped_early"]
    a = torch.load(tmp_path / "a" / CHECKPOINT, map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "b" / CHECKPOINT, map_location="cpu", weights_only=False)

    def same(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        return x == y
    for key in ("student", "ema", "disc", "opt_g", "opt_d", "sched_g", "sched_d", "step"):
        assert same(a[key], b[key]), key
    # The trained student: every format, and taesd.load reads them back to the same network.
    files = {Path(p).name for p in straight["files"]}
    assert {"taef2_encoder.pth", "taef2_decoder.safetensors", "taef2.safetensors"} <= files
    ema = a["ema"]
    student_dir = tmp_path / "a" / "student"
    for weights in (student_dir / "taef2_encoder.pth", student_dir / "taef2.safetensors"):
        model = taesd.load("taef2", weights=weights, device="cpu")
        for k, t in model.encoder.state_dict().items():
            assert torch.equal(t, ema[f"encoder.{k}"])


def test_two_processes_hold_identical_weights(photos, tmp_path, weights):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
           "TAESD_WEIGHTS": str(weights)}
    # torch's launcher starts the two processes; Accelerate takes the gloo process group from its env.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "taesd", "train",
           "--data", str(photos), "--out", str(out), "--teacher", "taef2", "--student", "custom",
           "--width", "8", "--depth", "1", "--batch", "2", "--crop", "16", "--eval-crop", "32",
           "--steps", "3",
           "--adv-weight", "0.1", "--ema", "0.9", "--cpu", "--threads", "1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2 and report["step"] == 3
    assert len(report["replica_digests"]) == 2 and report["replicas_identical"]


def test_diffusers_teacher_with_latent_cache(photos, tmp_path):
    # A real (randomly initialised) diffusers AutoencoderKL saved to a folder, used as the teacher.
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    report = train(tiny(tmp_path / "run", photos, teacher=str(tmp_path / "vae"), family="taesd", steps=2,
                        cache_latents=True, decoder_target="teacher"))
    assert report["step"] == 2
    shards = list((tmp_path / "run" / "latent_cache").glob("shard_*.safetensors"))
    assert shards
    from safetensors.torch import load_file

    from taesd.evaluation.teachers import load_teacher
    cached = load_file(str(shards[0]))
    teacher = load_teacher(str(tmp_path / "vae"), family="taesd", device="cpu")
    assert teacher.scale == taesd.get_variant("taesd").vae_scale
    image = cached["0.image"].float()[None]
    expected = (vae.encode(image * 2 - 1).latent_dist.mode() - 0.0) * teacher.scale
    torch.testing.assert_close(cached["0.latent"][None], expected, rtol=1e-4, atol=1e-5)
