"""The training pieces one by one: the crop stream and its sharding, students, teachers, the
learning-rate schedule, the config's declarations and checks, CsvLog, the stop flag and the
checkpoint. Real photos (scikit-image), the real taef2 weights."""
import csv
import itertools
import random
import signal
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import taesd
from taesd.errors import TaesdError
from taesd.evaluation.teachers import TaesdTeacher, load_teacher
from taesd.training.checkpoint import KEYS, read_checkpoint, rng_states, set_rng_states
from taesd.training.config import TrainConfig, config_from_dict, lr_factor
from taesd.training.data import ImageCrops, ShardSampler, crop_loader
from taesd.training.logs import CsvLog
from taesd.training.loop import CHECKPOINT, train
from taesd.training.stop import StopFlag
from taesd.training.students import build_student

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    import skimage.data
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        Image.fromarray(arr).resize((64, 64), Image.LANCZOS).save(folder / f"{name}.png")
    return folder


# --- data ---------------------------------------------------------------------------------------

def test_crops_depend_only_on_seed_and_sample_number(photos):
    a = ImageCrops(str(photos), 32, seed=5, colour_aug=0.5)
    b = ImageCrops(str(photos), 32, seed=5, colour_aug=0.5)
    samples = [0, 3, 4, 17, 23]  # 17 and 23: later epochs (5 files)
    first = [a[n].image for n in samples]
    second = [b[n].image for n in reversed(samples)][::-1]  # another order, another decoded-image cache
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    assert first[0].shape == (3, 32, 32)
    assert not torch.equal(a[0].image, a[1].image)
    assert not torch.equal(a[0].image, ImageCrops(str(photos), 32, seed=6, colour_aug=0.5)[0].image)
    for epoch in range(3):  # every epoch visits every image once, in a fresh order
        assert sorted(a.order(epoch).tolist()) == list(range(len(PHOTOS)))
    assert a.order(0).tolist() != a.order(1).tolist() or a.order(1).tolist() != a.order(2).tolist()


def test_shard_sampler_splits_the_stream_without_gaps_or_overlaps():
    world = 3
    taken = [list(itertools.islice(ShardSampler(12, rank, world), 4)) for rank in range(world)]
    assert taken[1] == [13, 16, 19, 22]
    assert sorted(sum(taken, [])) == list(range(12, 24))


def test_a_loader_started_at_sample_s_continues_the_stream(photos):
    ds = ImageCrops(str(photos), 16, seed=1, colour_aug=0.5)
    from_start = iter(crop_loader(ds, 2, 0))
    for _ in range(3):
        next(from_start)
    resumed = next(iter(crop_loader(ds, 2, 6)))  # what a run resumed at step 3 (batch 2) reads
    assert torch.equal(next(from_start)["images"], resumed["images"])


# --- students and teachers ----------------------------------------------------------------------

def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("width,depth", [(16, 1), (32, 2), (64, 3)])
def test_custom_student_parameter_counts(width, depth):
    c, w, d = 4, width, depth
    block = 3 * (9 * w * w + w)  # three 3x3 convs with bias
    encoder = 28 * w + (1 + 3 * d) * block + 3 * 9 * w * w + 9 * w * c + c
    decoder = 9 * c * w + w + (3 * d + 1) * block + 3 * 9 * w * w + 27 * w + 3
    student = build_student("custom", latent_channels=c, width=w, depth=d)
    assert (n_params(student.encoder), n_params(student.decoder)) == (encoder, decoder)
    if (w, d) == (64, 3):  # the published base design: exactly taesd's network
        model = taesd.create("taesd")
        assert (n_params(model.encoder), n_params(model.decoder)) == (encoder, decoder)


def test_registry_student_is_taesd_create():
    student = build_student("taesdxl", seed=7)
    model = taesd.create("taesdxl", seed=7)
    for part in ("encoder", "decoder"):
        ours, theirs = getattr(student, part).state_dict(), getattr(model, part).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(TaesdError, match="latent"):
        build_student("taesdxl", latent_channels=32)


def test_taesd_teacher_gives_taesd_latents(weights):
    from conftest import photo
    teacher = load_teacher("taef2", weights, device="cpu")
    assert isinstance(teacher, TaesdTeacher) and teacher.latent_channels == 32 and teacher.downscale == 8
    image = photo("chelsea", 128)[None]
    model = taesd.load("taef2", weights, device="cpu")
    latents = teacher.encode(image)
    assert torch.equal(latents, model.encode(image).float())
    assert torch.equal(teacher.decode(latents), model.decode(latents).clamp(0, 1).float())


# --- config, schedule ---------------------------------------------------------------------------

def test_every_option_is_documented_where_declared():
    for f in fields(TrainConfig):
        assert f.metadata["help"], f.name
        if f.name != "progress":
            assert f.metadata["group"], f.name


@pytest.mark.parametrize("options,flag", [
    (dict(batch=0), "--batch"), (dict(grad_accum=0), "--grad-accum"), (dict(log_every=0), "--log-every"),
    (dict(eval_every=-1), "--eval-every"), (dict(ckpt_every=0), "--ckpt-every"), (dict(lr=0.0), "--lr"),
    (dict(ema=1.0), "--ema"), (dict(parts="both-ish"), "--parts"),
    (dict(save_formats=["pth", "jpg"]), "--save-formats"),
    (dict(colour_aug=float("nan")), "--colour-aug"), (dict(resume=True, overwrite=True), "--resume"),
])
def test_config_refuses_bad_values_in_one_line(options, flag):
    with pytest.raises(TaesdError, match=flag) as e:
        TrainConfig(data="photos", **options)
    assert "\n" not in str(e.value)


def test_config_from_dict_refuses_unknown_options():
    with pytest.raises(TaesdError, match="unknown training options: colour"):
        config_from_dict({"data": "x", "colour": 1})


def test_lr_factor_warmup_and_cosine():
    warm = TrainConfig(data="x", steps=10, warmup=4)
    assert [lr_factor(warm, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = TrainConfig(data="x", steps=11, lr_decay="cosine")
    assert lr_factor(cosine, 0) == pytest.approx(1.0)
    assert lr_factor(cosine, 5) == pytest.approx(0.55)
    assert lr_factor(cosine, 10) == pytest.approx(0.1)
    values = [lr_factor(cosine, s) for s in range(11)]
    assert values == sorted(values, reverse=True)


# --- logs, stop flag, checkpoint ----------------------------------------------------------------

def test_csv_log_grows_columns_and_resumes(tmp_path):
    path = tmp_path / "metrics.csv"
    log = CsvLog(path, keep=False)
    log.add({"step": 1, "loss": 0.5})
    log.add({"step": 2, "loss": 0.25, "psnr": 20.123456789})
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "psnr"]
    assert rows[0]["psnr"] == "" and rows[1]["psnr"] == "20.1235"
    again = CsvLog(path, keep=True)
    again.drop_after(1)
    again.add({"step": 2, "loss": 0.3})
    with open(path) as f:
        assert [(r["step"], r["loss"]) for r in csv.DictReader(f)] == [("1", "0.5"), ("2", "0.3")]
    assert CsvLog(path, keep=False).rows == []


def test_stop_flag_catches_sigterm_and_sigint_then_restores_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    for sig in (signal.SIGTERM, signal.SIGINT):
        with StopFlag() as flag:
            assert not flag.stop
            signal.raise_signal(sig)
            assert flag.stop
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_rng_states_round_trip_through_a_safe_load(tmp_path):
    state = rng_states()
    expected = (torch.rand(3), random.random(), np.random.rand(3))
    torch.save(state, tmp_path / "rng.pt")
    torch.rand(5), random.random(), np.random.rand(7)
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1]
    assert np.array_equal(expected[2], again[2])


def test_checkpoint_round_trip(photos, tmp_path, weights):
    cfg = TrainConfig(data=str(photos), out=str(tmp_path / "run"), teacher_weights=str(weights), width=8,
                      depth=1, batch=2, crop=16, eval_crop=32, steps=2, ema=0.9, cpu=True, threads=1,
                      progress=False)
    train(cfg)
    checkpoint = read_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert set(KEYS) <= set(checkpoint) and checkpoint["step"] == 2
    assert checkpoint["config"]["width"] == 8 and checkpoint["disc"] is not None
    from taesd.training.students import load_student
    saved = load_student(tmp_path / "run" / "student")  # the EMA weights
    assert all(torch.equal(t, checkpoint["ema"][k]) for k, t in saved.state_dict().items())
    data = (tmp_path / "run" / CHECKPOINT).read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(TaesdError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "cut.pt")
    torch.save({"step": 1}, tmp_path / "other.pt")
    with pytest.raises(TaesdError, match="not a taesd training checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
