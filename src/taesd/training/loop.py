"""Distil a tiny autoencoder from a big one: the training loop, top to bottom, on HF Accelerate.

The published recipe: weights start from scratch; the student encoder learns the teacher's
latents (MSE, in TAESD's convention); the student decoder is fed the *teacher's* latents and learns
to reproduce the image with a latent-conditioned patch discriminator (adversarial) plus a small
MSE/L1 term; no KL. Adam lr 3e-4, betas (0.9, 0.9), batch 16; colour augmentation on a few
percent of samples; small random crops first, then fine-tune at 256 x 256.

The same code runs as one CPU process (``taesd train``) and under ``accelerate launch`` on many
GPUs or nodes (DDP). Every random choice of the data comes from (seed, sample number), and the
checkpoint holds models, EMA, optimizers, schedulers, RNG states and the step, so a run that is
interrupted (Ctrl-C saves a checkpoint) and resumed ends with the same weights, bit for bit, as one
that never stopped.

    from taesd.training.loop import TrainConfig, train
    train(TrainConfig(data="photos/", teacher="taef2", student="custom", width=32, out="runs/t"))
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from taesd.training.data import ImageCrops, build_latent_cache, crop_loader, load_latent_cache
from taesd.training.discriminator import PatchDiscriminator, discriminator_loss, generator_loss
from taesd.errors import TaesdError
from taesd.io.files import atomic_path
from taesd.io.inputs import IMAGE_SUFFIXES, expand_inputs
from taesd.io.images import load_image, save_image
from taesd.evaluation.metrics import psnr
from taesd.training.students import Student, build_student, save_student
from taesd.training.teachers import load_teacher

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    data: str = ""                     # folder of training images
    out: str = "runs/taesd"            # checkpoints, logs, samples, the trained student
    # teacher: a TAESD variant name or a diffusers autoencoder folder
    teacher: str = "taef2"
    teacher_weights: str | None = None
    scale: float | None = None         # taesd latents = (raw - shift) * scale (diffusers teachers)
    shift: float | None = None
    family: str | None = None          # take scale/shift from this registry variant
    # student: a registry architecture or "custom" (width x depth)
    student: str = "custom"
    width: int = 64
    depth: int = 3
    parts: str = "both"                # both | encoder | decoder
    # optimisation (the published recipe's numbers)
    steps: int = 1000
    batch: int = 16                    # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.9)
    warmup: int = 0
    lr_decay: str = "none"             # none | cosine (to 10% at the last step)
    grad_clip: float = 1.0             # 0 = off
    ema: float = 0.0                   # EMA decay of the student, e.g. 0.999 (0 = off)
    mixed_precision: str = "no"        # no | fp16 | bf16
    cpu: bool = False
    threads: int = 0                   # CPU threads per process (0: torch's default); 1 wins on busy CPUs
    seed: int = 0
    # data
    crop: int = 128
    final_crop: int = 256              # the last final_steps steps train at this crop
    final_steps: int = 0
    colour_aug: float = 0.05
    workers: int = 0
    cache_latents: bool = False        # run the teacher once per image; shards in OUT/latent_cache
    # losses
    latent_weight: float = 1.0
    mse_weight: float = 1.0
    l1_weight: float = 0.0
    decoder_target: str = "image"      # image (the recipe) | teacher (the teacher's own decode)
    adv_weight: float = 0.1
    adv_loss: str = "hinge"            # hinge | lsgan
    adv_adaptive: bool = True          # scale the adversarial gradient to the reconstruction's
    adv_start: int = 0                 # step at which the adversarial term starts
    disc_lr: float = 3e-4
    disc_width: int = 64
    # bookkeeping
    holdout: list[str] = field(default_factory=list)   # images for evaluation (not in data)
    eval_crop: int = 256
    eval_every: int = 100
    ckpt_every: int = 200
    log_every: int = 10
    resume: bool = False
    time_limit: float = 0.0            # seconds; stop (and finish normally) when exceeded (0: none)
    save_formats: list[str] | None = None
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# Small pieces the loop uses
# ---------------------------------------------------------------------------------------------

def crop_at(cfg: TrainConfig, step: int) -> int:
    return cfg.final_crop if cfg.final_steps and step >= cfg.steps - cfg.final_steps else cfg.crop


def lr_factor(cfg: TrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    if cfg.lr_decay == "cosine":
        progress = min(1.0, step / max(1, cfg.steps - 1))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return warm


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


@torch.no_grad()
def ema_update(ema: Student, model: Student, decay: float) -> None:
    ema_p, model_p = list(ema.parameters()), [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1 - decay)


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, t in module.state_dict().items():
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def holdout_images(cfg: TrainConfig, dataset: ImageCrops, multiple: int) -> torch.Tensor:
    """Centre crops (eval_crop square) of the hold-out images, else of the first training images."""
    files = expand_inputs(cfg.holdout, IMAGE_SUFFIXES) if cfg.holdout else dataset.files
    out = []
    for f in files:
        if len(out) == 2 and not cfg.holdout:
            break
        try:
            img = load_image(f, 3)
        except TaesdError:
            continue  # unreadable: the training stream skips and counts it
        c = min(cfg.eval_crop, *img.shape[-2:])
        c -= c % multiple
        top, left = (img.shape[-2] - c) // 2, (img.shape[-1] - c) // 2
        out.append(img[:, top:top + c, left:left + c])
    size = min(o.shape[-1] for o in out)
    return torch.stack([o[:, :size, :size] for o in out])


@torch.no_grad()
def evaluate(student: Student, teacher, images: torch.Tensor, t_lat: torch.Tensor, t_dec: torch.Tensor) -> tuple[dict, list]:
    """Hold-out numbers: the student against the teacher's decode (and the real image)."""
    student.eval()
    rows, m = [images, t_dec], {}
    if student.decoder is not None:
        dec = student.decoder(t_lat).float().clamp(0, 1)
        m["psnr_decoder_vs_teacher"] = psnr(dec, t_dec).mean().item()
        m["psnr_decoder_vs_image"] = psnr(dec, images).mean().item()
        rows.append(dec)
    if student.encoder is not None:
        s_lat = student.encoder(images).float()
        m["latent_mse"] = F.mse_loss(s_lat, t_lat).item()
        rt = (student.decoder(s_lat) if student.decoder is not None else teacher.decode(s_lat)).float().clamp(0, 1)
        m["psnr_roundtrip_vs_teacher"] = psnr(rt, t_dec).mean().item()
        m["psnr_roundtrip_vs_image"] = psnr(rt, images).mean().item()
        rows.append(rt)
    student.train()
    return m, rows


def save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """One row per kind (image, teacher, student decoder, student round trip), one column per image."""
    grid = torch.cat([torch.cat(list(r.float().cpu()), -1) for r in rows], -2)
    save_image(grid, path)


def plot_curve(csv_path: Path, png_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key, label in [("psnr_decoder_vs_teacher", "student decoder (teacher latents)"),
                       ("psnr_roundtrip_vs_teacher", "student round trip")]:
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("hold-out PSNR vs teacher decode (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


class CsvLog:
    """Append rows to a CSV whose columns may grow (the file is rewritten atomically)."""

    def __init__(self, path: Path, keep: bool):
        self.path = path
        self.rows: list[dict] = []
        if keep and path.is_file():
            with open(path) as f:
                self.rows = list(csv.DictReader(f))

    def drop_after(self, step: int) -> None:  # a resumed run redoes the steps after its checkpoint
        self.rows = [r for r in self.rows if int(r["step"]) <= step]

    def add(self, row: dict) -> None:
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(self.rows)


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step and checkpoint."""

    def __init__(self):
        self.stop = False
        self.old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # only the main thread may set handlers
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.stop = True

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, callback=None) -> dict:
    """Run (or resume) a distillation; returns the final report. ``callback(step, metrics)`` is
    called after every optimizer step (hooks for tests and notebooks)."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    if cfg.parts not in ("both", "encoder", "decoder"):
        raise TaesdError(f"parts must be both, encoder or decoder, not {cfg.parts!r}")
    if cfg.decoder_target not in ("image", "teacher"):
        raise TaesdError(f"decoder_target must be image or teacher, not {cfg.decoder_target!r}")
    if cfg.lr_decay not in ("none", "cosine"):
        raise TaesdError(f"lr_decay must be none or cosine, not {cfg.lr_decay!r}")
    if cfg.adv_loss not in ("hinge", "lsgan"):
        raise TaesdError(f"adv_loss must be hinge or lsgan, not {cfg.adv_loss!r}")
    from taesd.io.inputs import IMAGE_SUFFIXES, expand_inputs
    expand_inputs([cfg.data], IMAGE_SUFFIXES, "image")  # fail before creating the run folder
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    acc = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision)
    out = Path(cfg.out)
    main = acc.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    if acc.device.type == "cpu":  # bit-exact resume is promised on the CPU; GPUs keep their fast kernels
        torch.use_deterministic_algorithms(True, warn_only=True)

    # Teacher (frozen) and student (fresh weights, the same on every process: same seed).
    teacher = load_teacher(cfg.teacher, cfg.teacher_weights, cfg.scale, cfg.shift, cfg.family, device=acc.device)
    parts = ("encoder", "decoder") if cfg.parts == "both" else (cfg.parts,)
    student = build_student(cfg.student, parts, teacher.latent_channels, cfg.width, cfg.depth, seed=cfg.seed)
    ema = build_student(cfg.student, parts, teacher.latent_channels, cfg.width, cfg.depth) if cfg.ema else None
    if ema is not None:
        ema.load_state_dict(student.state_dict())
        ema.requires_grad_(False).to(acc.device)
    use_adv = cfg.adv_weight > 0 and student.decoder is not None
    disc = PatchDiscriminator(teacher.latent_channels, cfg.disc_width, teacher.downscale) if use_adv else None

    opt_g = torch.optim.Adam(student.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: lr_factor(cfg, s))
    if use_adv:
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=tuple(cfg.betas))
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lambda s: lr_factor(cfg, s))
        student, disc, opt_g, opt_d = acc.prepare(student, disc, opt_g, opt_d)
    else:
        student, opt_g = acc.prepare(student, opt_g)
    raw_student = acc.unwrap_model(student)
    raw_disc = acc.unwrap_model(disc) if use_adv else None

    # Resume: everything that decides the rest of the run comes back from the checkpoint.
    step, skipped, seconds_before = 0, set(), 0.0
    ckpt_path = out / CHECKPOINT
    if cfg.resume:
        if not ckpt_path.is_file():
            raise TaesdError(f"--resume: no checkpoint at {ckpt_path}; start without --resume")
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        raw_student.load_state_dict(ck["student"])
        opt_g.load_state_dict(ck["opt_g"])
        sched_g.load_state_dict(ck["sched_g"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        if use_adv:
            raw_disc.load_state_dict(ck["disc"])
            opt_d.load_state_dict(ck["opt_d"])
            sched_d.load_state_dict(ck["sched_d"])
        set_rng_states(ck["rng"][min(acc.process_index, len(ck["rng"]) - 1)])
        step, skipped, seconds_before = ck["step"], set(ck["skipped"]), ck.get("seconds", 0.0)

    def save_checkpoint():
        states = gather_object([rng_states()])
        if main:
            ck = {"step": step, "config": asdict(cfg), "student": raw_student.state_dict(),
                  "ema": ema.state_dict() if ema is not None else None, "opt_g": opt_g.state_dict(),
                  "sched_g": sched_g.state_dict(), "rng": states, "skipped": sorted(skipped),
                  "seconds": seconds_before + time.time() - t_start}
            if use_adv:
                ck.update(disc=raw_disc.state_dict(), opt_d=opt_d.state_dict(), sched_d=sched_d.state_dict())
            with atomic_path(ckpt_path) as tmp:
                torch.save(ck, tmp)
        acc.wait_for_everyone()

    # Data: this process's share of the endless crop stream, from the current sample on.
    world, global_batch = acc.num_processes, cfg.batch * acc.num_processes * cfg.grad_accum
    crops = {cfg.crop, cfg.final_crop if cfg.final_steps else cfg.crop}
    cache = None
    if cfg.cache_latents:
        files = ImageCrops(cfg.data, cfg.crop, multiple=teacher.downscale).files
        build_latent_cache(files, teacher, out / "latent_cache", max(crops), cfg.decoder_target == "teacher",
                           acc.process_index, world)
        acc.wait_for_everyone()
        cache = load_latent_cache(out / "latent_cache")
    datasets = {c: ImageCrops(cfg.data, c, cfg.seed, cfg.colour_aug, teacher.downscale, cache) for c in crops}

    def batches_from(s: int):
        return iter(crop_loader(datasets[crop_at(cfg, s)], cfg.batch, s * global_batch, acc.process_index,
                                world, cfg.workers))

    # Logs, hold-out images, and the teacher's view of them (computed once).
    log = CsvLog(out / "metrics.csv", keep=cfg.resume)
    log.drop_after(step)
    tb = None
    if main:
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(out / "tensorboard"), purge_step=step if cfg.resume else None)
    eval_images = holdout_images(cfg, datasets[cfg.crop], teacher.downscale).to(acc.device)
    eval_t_lat = teacher.encode(eval_images)
    eval_t_dec = teacher.decode(eval_t_lat)

    def run_eval():
        model = ema if ema is not None else raw_student
        metrics, rows = evaluate(model, teacher, eval_images, eval_t_lat, eval_t_dec)
        if main:
            save_grid(rows, out / "samples" / f"step_{step:06d}.png")
        return metrics

    if main and step == 0:
        first = run_eval()
        log.add({"step": 0, **first})
        if tb:
            for k, v in first.items():
                tb.add_scalar(f"eval/{k}", v, 0)

    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not (main and cfg.progress), dynamic_ncols=True)
    t_start, images_seen, t_window = time.time(), 0, time.time()
    batches, batches_crop = batches_from(step), crop_at(cfg, step)
    stopped = False
    student.train()
    with StopFlag() as flag:
        while step < cfg.steps:
            if crop_at(cfg, step) != batches_crop:  # switch to the fine-tuning crop size
                batches, batches_crop = batches_from(step), crop_at(cfg, step)
            adv_on = use_adv and step >= cfg.adv_start
            sums: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                skipped.update(batch["skipped"])
                images = batch["images"].to(acc.device)
                cached = batch["latents"] is not None
                t_lat = batch["latents"].to(acc.device) if cached else teacher.encode(images)
                target = images
                if cfg.decoder_target == "teacher" and raw_student.decoder is not None:
                    target = batch["decoded"].to(acc.device) if cached else teacher.decode(t_lat)
                last = micro == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if last else acc.no_sync(student)

                # Student step: latent MSE, reconstruction, adversarial (discriminator frozen).
                with sync:
                    s_lat, s_dec = student(images if raw_student.encoder is not None else None,
                                           t_lat if raw_student.decoder is not None else None)
                    loss = torch.zeros((), device=acc.device)
                    if s_lat is not None:
                        lat_loss = F.mse_loss(s_lat.float(), t_lat)
                        loss = loss + cfg.latent_weight * lat_loss
                        sums["latent"] = sums.get("latent", 0) + lat_loss.item()
                    if s_dec is not None:
                        s_dec = s_dec.float()
                        rec = cfg.mse_weight * F.mse_loss(s_dec, target) + cfg.l1_weight * F.l1_loss(s_dec, target)
                        loss = loss + rec
                        sums["rec"] = sums.get("rec", 0) + rec.item()
                        if adv_on:
                            raw_disc.requires_grad_(False)
                            with acc.autocast():
                                g_adv = generator_loss(raw_disc(s_dec, t_lat).float(), cfg.adv_loss)
                            raw_disc.requires_grad_(True)
                            w = cfg.adv_weight
                            if cfg.adv_adaptive:  # balance the two gradients where they meet: the output image
                                g_rec_grad, = torch.autograd.grad(rec, s_dec, retain_graph=True)
                                g_adv_grad, = torch.autograd.grad(g_adv, s_dec, retain_graph=True)
                                w = w * (g_rec_grad.norm() / (g_adv_grad.norm() + 1e-8)).clamp(max=1e4).detach()
                            loss = loss + w * g_adv
                            sums["g_adv"] = sums.get("g_adv", 0) + g_adv.item()
                    acc.backward(loss / cfg.grad_accum)

                # Discriminator step: real (the target) vs fake (the student's decode), one batch.
                if adv_on:
                    with (contextlib.nullcontext() if last else acc.no_sync(disc)):
                        with acc.autocast():
                            logits = disc(torch.cat([target, s_dec.detach()]), torch.cat([t_lat, t_lat])).float()
                        real, fake = logits.chunk(2)
                        d_loss = discriminator_loss(real, fake, cfg.adv_loss)
                        acc.backward(d_loss / cfg.grad_accum)
                    sums["d"] = sums.get("d", 0) + d_loss.item()
                images_seen += images.shape[0] * world

            if cfg.grad_clip:
                acc.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            sched_g.step()
            if use_adv:
                if adv_on:
                    opt_d.step()
                    sched_d.step()
                opt_d.zero_grad(set_to_none=True)
            if ema is not None:  # warm-up: early on the EMA follows the fresh weights closely
                ema_update(ema, raw_student, min(cfg.ema, (1 + step) / (10 + step)))
            step += 1
            bar.update(1)

            losses = {k: v / cfg.grad_accum for k, v in sums.items()}
            if step % cfg.log_every == 0 or step == cfg.steps:
                rate = images_seen / max(time.time() - t_window, 1e-9)
                bar.set_postfix({**{k: f"{v:.4f}" for k, v in losses.items()}, "img/s": f"{rate:.1f}"})
                row = {"step": step, **{f"loss_{k}": v for k, v in losses.items()}, "images_per_s": rate,
                       "lr": sched_g.get_last_lr()[0], "skipped_files": len(skipped)}
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    row.update(run_eval())
                if main:
                    log.add(row)
                    if tb:
                        for k, v in row.items():
                            if k != "step":
                                tb.add_scalar(("eval/" if k.startswith(("psnr", "latent_mse")) else "train/") + k, v, step)
                images_seen, t_window = 0, time.time()
            elif step % cfg.eval_every == 0:
                m = run_eval()
                if main:
                    log.add({"step": step, **m})
            if callback is not None:
                callback(step, losses)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save_checkpoint()
            out_of_time = bool(cfg.time_limit) and time.time() - t_start > cfg.time_limit
            stop_here = flag.stop
            if world > 1:  # every process stops at the same step
                votes = acc.reduce(torch.tensor([float(flag.stop), float(out_of_time)], device=acc.device), "sum")
                stop_here, out_of_time = votes[0].item() > 0, votes[1].item() > 0
            if (stop_here or out_of_time) and step < cfg.steps:
                save_checkpoint()
                stopped = stop_here
                if out_of_time and not stop_here and main and step % cfg.eval_every:
                    log.add({"step": step, **run_eval()})  # the curve ends where training did
                break
    bar.close()

    # The result: the trained student (EMA weights when used) in every format, and a report.
    final = ema if ema is not None else raw_student
    digests = gather_object([weights_digest(raw_student)])
    report = {"step": step, "stopped_early": stopped, "processes": world,
              "seconds": seconds_before + time.time() - t_start,
              "skipped_files": sorted(skipped), "replica_digests": digests,
              "replicas_identical": len(set(digests)) == 1}
    if not stopped:
        report["eval"] = {k: v for k, v in evaluate(final, teacher, eval_images, eval_t_lat, eval_t_dec)[0].items()}
        rates = [float(r["images_per_s"]) for r in log.rows if r.get("images_per_s")]
        report["images_per_s_median"] = sorted(rates)[len(rates) // 2] if rates else None
    if main:
        if not stopped:
            report["files"] = [str(p) for p in save_student(final, out / "student", cfg.save_formats)]
            with contextlib.suppress(ImportError):
                plot_curve(out / "metrics.csv", out / "learning_curve.png")
        with atomic_path(out / "report.json") as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        if tb:
            tb.close()
    acc.wait_for_everyone()
    acc.end_training()
    return report


def config_from_dict(d: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(d) - known
    if unknown:
        raise TaesdError(f"unknown training options: {', '.join(sorted(unknown))}")
    return TrainConfig(**d)
