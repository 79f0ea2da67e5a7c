"""A training run's state (``Run``) and how it is set up (``setup``), in this order:

1. ``preflight``: every check that needs no network, before anything is created: the data (at least
   one image readable), the hold-out images, the run folder (one that holds a run needs ``--resume``
   or ``--overwrite``) and, on ``--resume``, the checkpoint (readable, same architecture options).
   The options themselves were checked when the ``TrainConfig`` was built.
2. The accelerator, the teacher (frozen) and the networks: student (fresh weights, the same on every
   process: same seed), its EMA, the discriminator, optimizers and schedulers; the checkpoint's
   state put back into them.
3. Only then the run folder: created (or cleared with ``--overwrite``: only the files taesd wrote, see
   ``taesd.training.run_folder``) and marked as taesd's, the latent cache, the crop
   streams, the logs and the hold-out set. A failure in this step removes a folder it created, so
   no failure leaves an empty run folder behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from taesd.errors import TaesdError
from taesd.evaluation.teachers import load_teacher
from taesd.io.images import load_image
from taesd.io.inputs import IMAGE_SUFFIXES, expand_inputs
from taesd.training.checkpoint import CHECKPOINT, check_resumable, read_checkpoint, restore
from taesd.training.config import TrainConfig, crop_at, crop_sizes, lr_factor
from taesd.training.data import ImageCrops, build_latent_cache, crop_loader, load_latent_cache
from taesd.training.discriminator import PatchDiscriminator
from taesd.training.holdout import Holdout, evaluate
from taesd.training.logs import CsvLog, Tensorboard, save_grid
from taesd.training.run_folder import check_overwritable, clear_run, held_run_files, mark
from taesd.training.students import Student, build_student

# The least memory one micro-batch takes, per input value: the teacher's first layers hold 64 channels
# for each 3 of the input. A --batch far beyond the machine is refused before the run folder exists.
MIN_BYTES_PER_INPUT_VALUE = 4 * 64 / 3


@dataclass(eq=False)
class Run:
    cfg: TrainConfig
    acc: Any                     # accelerate.Accelerator
    out: Path
    teacher: Any
    student: torch.nn.Module     # as prepared by the accelerator (DDP-wrapped on many processes)
    raw_student: Student
    ema: Student | None
    disc: torch.nn.Module | None
    raw_disc: torch.nn.Module | None
    opt_g: Any
    sched_g: Any
    opt_d: Any = None
    sched_d: Any = None
    datasets: dict[int, ImageCrops] = field(default_factory=dict)
    log: CsvLog | None = None
    tb: Tensorboard | None = None
    holdout: Holdout | None = None
    bar: Any = None
    step: int = 0
    skipped: set[str] = field(default_factory=set)
    seconds_before: float = 0.0  # trained before the last resume
    t_start: float = 0.0
    t_window: float = 0.0        # start of the current throughput window
    images_seen: int = 0         # in that window, all processes
    stopped: bool = False        # by Ctrl-C / SIGTERM (not by the time limit)
    batches: Any = None
    batches_crop: int = 0

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def adv_on(self) -> bool:
        return self.disc is not None and self.step >= self.cfg.adv_start

    def seconds(self) -> float:
        return self.seconds_before + time.time() - self.t_start

    def final_model(self) -> Student:
        return self.ema if self.ema is not None else self.raw_student

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This process's next micro-batch with the teacher's latents and the decoder's target."""
        cfg, device = self.cfg, self.acc.device
        crop = crop_at(cfg, self.step)
        if self.batches is None or crop != self.batches_crop:  # the first batch, or the fine-tuning crop
            start = self.step * cfg.batch * self.world * cfg.grad_accum
            self.batches = iter(crop_loader(self.datasets[crop], cfg.batch, start, self.acc.process_index,
                                            self.world, cfg.workers))
            self.batches_crop = crop
        batch = next(self.batches)
        self.skipped.update(batch["skipped"])
        images = batch["images"].to(device)
        cached = batch["latents"] is not None
        latents = batch["latents"].to(device) if cached else self.teacher.encode(images)
        target = images
        if cfg.decoder_target == "teacher" and self.raw_student.decoder is not None:
            target = batch["decoded"].to(device) if cached else self.teacher.decode(latents)
        self.images_seen += images.shape[0] * self.world
        return {"images": images, "latents": latents, "target": target}

    def evaluate(self) -> dict[str, float]:
        """Hold-out metrics of the model that will be saved; the sample grid on the main process."""
        metrics, rows = evaluate(self.final_model(), self.teacher, self.holdout)
        if self.main:
            save_grid(rows, self.out / "samples" / f"step_{self.step:06d}.png")
        return metrics


def setup(cfg: TrainConfig) -> Run:
    checkpoint = preflight(cfg)
    acc = make_accelerator(cfg)
    teacher = load_teacher(cfg.teacher, cfg.teacher_weights, cfg.scale, cfg.shift, cfg.family,
                           device=acc.device)
    multiple = teacher.downscale
    for crop in crop_sizes(cfg):
        if crop % multiple:
            raise TaesdError(f"crop size {crop} is not a multiple of the teacher's downscale {multiple}; "
                             f"pick e.g. {crop - crop % multiple or multiple}")
    run = build_networks(cfg, acc, teacher)
    if checkpoint is not None:
        restore(run, checkpoint)
    with removed_on_failure(run.out, run.main):
        open_run_folder(run)
        open_data(run)
        open_logs(run)
    run.bar = tqdm(total=cfg.steps, initial=run.step, desc="train", disable=not (run.main and cfg.progress),
                   dynamic_ncols=True)
    run.t_start = run.t_window = time.time()
    run.student.train()
    return run


def preflight(cfg: TrainConfig) -> dict | None:
    """Check the data, the hold-out images and the run folder; the checkpoint to resume from."""
    first_readable(expand_inputs([cfg.data], IMAGE_SUFFIXES, "image"), f"--data {cfg.data}")
    if cfg.holdout:
        first_readable(expand_inputs(cfg.holdout, IMAGE_SUFFIXES, "image"), "--holdout")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TaesdError(f"--out {out} is a file; pass a folder for the run")
    if cfg.resume:
        checkpoint = read_checkpoint(out / CHECKPOINT)
        check_resumable(cfg, checkpoint, out / CHECKPOINT)
        return checkpoint
    held = held_run_files(out)
    if held and not cfg.overwrite:
        raise TaesdError(f"{out} holds a run ({', '.join(held)}); pass --resume to continue or --overwrite "
                         f"to start over")
    if cfg.overwrite:
        check_overwritable(out)
    check_batch_fits(cfg)
    return None


def check_batch_fits(cfg: TrainConfig) -> None:
    """Refuse a micro-batch that cannot fit in this machine's memory, whatever the networks."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    crop = max(crop_sizes(cfg))
    need = cfg.batch * 3 * crop * crop * MIN_BYTES_PER_INPUT_VALUE
    if need > total:
        most = max(1, int(total // (3 * crop * crop * MIN_BYTES_PER_INPUT_VALUE)))
        raise TaesdError(f"--batch {cfg.batch} at crop {crop} needs at least {need / 2**30:.0f} GiB for one "
                         f"micro-batch, more than this machine's {total / 2**30:.0f} GiB; use --batch {most} "
                         f"or less (and --grad-accum for a larger effective batch)")


def first_readable(files: list[Path], what: str) -> None:
    """Raise unless at least one of ``files`` is a readable image (the stream skips the others)."""
    reason = ""
    for f in files:
        try:
            load_image(f, 3)
            return
        except TaesdError as e:
            reason = str(e)
    raise TaesdError(f"{what}: none of the {len(files)} images can be read (last: {reason})")


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        acc = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision)
    except (ValueError, RuntimeError) as e:
        raise TaesdError(f"accelerate cannot start this run: {str(e).splitlines()[0]}") from e
    set_seed(cfg.seed)
    if acc.device.type == "cpu":  # bit-exact resume is promised on the CPU; GPUs keep their fast kernels
        torch.use_deterministic_algorithms(True, warn_only=True)
    return acc


def build_networks(cfg: TrainConfig, acc, teacher) -> Run:
    """Student, EMA and discriminator with their optimizers and schedulers, prepared for ``acc``."""
    parts = ("encoder", "decoder") if cfg.parts == "both" else (cfg.parts,)
    channels = teacher.latent_channels
    student = build_student(cfg.student, parts, channels, cfg.width, cfg.depth, seed=cfg.seed)
    ema = None
    if cfg.ema:
        ema = build_student(cfg.student, parts, channels, cfg.width, cfg.depth)
        ema.load_state_dict(student.state_dict())
        ema.requires_grad_(False).to(acc.device)
    opt_g = torch.optim.Adam(student.parameters(), lr=cfg.lr, betas=cfg.betas)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: lr_factor(cfg, s))
    if cfg.adv_weight == 0 or student.decoder is None:
        student, opt_g = acc.prepare(student, opt_g)
        return Run(cfg, acc, Path(cfg.out), teacher, student, acc.unwrap_model(student), ema, None, None,
                   opt_g, sched_g)
    disc = PatchDiscriminator(channels, cfg.disc_width, teacher.downscale)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=cfg.betas)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lambda s: lr_factor(cfg, s))
    student, disc, opt_g, opt_d = acc.prepare(student, disc, opt_g, opt_d)
    return Run(cfg, acc, Path(cfg.out), teacher, student, acc.unwrap_model(student), ema, disc,
               acc.unwrap_model(disc), opt_g, sched_g, opt_d, sched_d)


@contextlib.contextmanager
def removed_on_failure(folder: Path, main: bool):
    """Remove ``folder`` if it did not exist before and the block fails."""
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if main and not existed:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def open_run_folder(run: Run) -> None:
    if run.main:
        if run.cfg.overwrite and run.out.is_dir():
            clear_run(run.out)
        run.out.mkdir(parents=True, exist_ok=True)
        mark(run.out)
    run.acc.wait_for_everyone()


def open_data(run: Run) -> None:
    """The crop streams (one per crop size), reading the teacher's outputs from the latent cache if asked."""
    cfg, acc = run.cfg, run.acc
    crops = crop_sizes(cfg)
    cache = None
    if cfg.cache_latents:
        files = expand_inputs([cfg.data], IMAGE_SUFFIXES)
        build_latent_cache(files, run.teacher, run.out / "latent_cache", max(crops),
                           cfg.decoder_target == "teacher", acc.process_index, acc.num_processes)
        acc.wait_for_everyone()
        cache = load_latent_cache(run.out / "latent_cache")
    run.datasets = {c: ImageCrops(cfg.data, c, cfg.seed, cfg.colour_aug, run.teacher.downscale, cache)
                    for c in crops}


def open_logs(run: Run) -> None:
    """metrics.csv (a resumed run drops the rows after its checkpoint), tensorboard, the hold-out set;
    a fresh run evaluates once at step 0."""
    cfg = run.cfg
    run.log = CsvLog(run.out / "metrics.csv", keep=cfg.resume)
    run.log.drop_after(run.step)
    run.tb = Tensorboard(run.out / "tensorboard" if run.main else None, run.step if cfg.resume else None)
    run.holdout = Holdout.build(cfg.holdout, run.datasets[cfg.crop].files, cfg.eval_crop, run.teacher,
                                run.acc.device)
    if run.main and run.step == 0:
        first = run.evaluate()
        run.log.add({"step": 0, **first})
        run.tb.add(first, 0)
