"""Distil a tiny autoencoder from a big one: the training loop, top to bottom, on HF Accelerate.

The published recipe: weights start from scratch; the student encoder learns the teacher's
latents (MSE, in TAESD's convention); the student decoder is fed the *teacher's* latents and learns
to reproduce the image with a latent-conditioned patch discriminator (adversarial) plus a small
MSE/L1 term; no KL. Adam lr 3e-4, betas (0.9, 0.9), batch 16; colour augmentation on a few
percent of samples; small random crops first, then fine-tune at 256 x 256.

The same code runs as one CPU process (``taesd train``) and under ``accelerate launch`` on many
GPUs or nodes (DDP). Every random choice of the data comes from (seed, sample number), and the
checkpoint holds models, EMA, optimizers, schedulers, RNG states and the step, so a run that is
interrupted (Ctrl-C or SIGTERM saves a checkpoint) and resumed ends with the same weights, bit for
bit, as one that never stopped. Set-up: ``training/run.py``; the checkpoint: ``training/checkpoint.py``.

    from taesd.training.loop import TrainConfig, train
    train(TrainConfig(data="photos/", teacher="taef2", student="custom", width=32, out="runs/t"))
"""
from __future__ import annotations

import contextlib
import json
import time

import torch
import torch.nn.functional as F

from taesd.io.files import atomic_path
from taesd.training.checkpoint import CHECKPOINT, save_checkpoint
from taesd.training.config import TrainConfig
from taesd.training.discriminator import discriminator_loss, generator_loss
from taesd.training.holdout import evaluate
from taesd.training.logs import plot_curve
from taesd.training.run import Run, setup
from taesd.training.stop import StopFlag
from taesd.training.students import ema_update, save_student, weights_digest

__all__ = ["CHECKPOINT", "TrainConfig", "train"]


def train(cfg: TrainConfig, callback=None) -> dict:
    """Run (or resume) a distillation; returns the final report. ``callback(step, losses)`` is
    called after every optimizer step (hooks for tests and notebooks)."""
    run = setup(cfg)
    with StopFlag() as flag:
        while run.step < cfg.steps:
            sums: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                last = micro == cfg.grad_accum - 1  # gradients are all-reduced on the last micro-batch only
                batch = run.next_batch()
                losses, decoded = student_step(run, batch, last)
                add(sums, losses)
                add(sums, disc_step(run, batch, decoded, last))  # nothing before --adv-start
            optimizer_step(run)
            run.step += 1
            log_eval_checkpoint(run, {k: v / cfg.grad_accum for k, v in sums.items()}, callback)
            if should_stop(run, flag):
                break
    return finish(run)


def add(sums: dict[str, float], losses: dict[str, float]) -> None:
    for k, v in losses.items():
        sums[k] = sums.get(k, 0.0) + v


def synced(run: Run, model, last: bool):
    return contextlib.nullcontext() if last else run.acc.no_sync(model)


def student_step(run: Run, batch: dict, last: bool) -> tuple[dict[str, float], torch.Tensor | None]:
    """Latent MSE (encoder), reconstruction + adversarial (decoder; discriminator frozen); backward."""
    cfg, latents, target = run.cfg, batch["latents"], batch["target"]
    losses = {}
    with synced(run, run.student, last):
        s_lat, s_dec = run.student(batch["images"] if run.raw_student.encoder is not None else None,
                                   latents if run.raw_student.decoder is not None else None)
        loss = torch.zeros((), device=run.acc.device)
        if s_lat is not None:
            latent_loss = F.mse_loss(s_lat.float(), latents)
            loss = loss + cfg.latent_weight * latent_loss
            losses["latent"] = latent_loss.item()
        if s_dec is not None:
            s_dec = s_dec.float()
            rec = cfg.mse_weight * F.mse_loss(s_dec, target) + cfg.l1_weight * F.l1_loss(s_dec, target)
            loss = loss + rec
            losses["rec"] = rec.item()
            if run.adv_on:
                g_adv, weight = adversarial_term(run, rec, s_dec, latents)
                loss = loss + weight * g_adv
                losses["g_adv"] = g_adv.item()
        run.acc.backward(loss / cfg.grad_accum)
    return losses, s_dec


def adversarial_term(run: Run, rec: torch.Tensor, s_dec: torch.Tensor, latents: torch.Tensor):
    """The generator's adversarial loss and its weight; adaptive: the two gradients balanced where
    they meet, at the output image."""
    run.raw_disc.requires_grad_(False)  # the generator's loss must not train the discriminator
    with run.acc.autocast():
        g_adv = generator_loss(run.raw_disc(s_dec, latents).float(), run.cfg.adv_loss)
    run.raw_disc.requires_grad_(True)
    weight = run.cfg.adv_weight
    if run.cfg.adv_adaptive:
        rec_grad, = torch.autograd.grad(rec, s_dec, retain_graph=True)
        adv_grad, = torch.autograd.grad(g_adv, s_dec, retain_graph=True)
        weight = weight * (rec_grad.norm() / (adv_grad.norm() + 1e-8)).clamp(max=1e4).detach()
    return g_adv, weight


def disc_step(run: Run, batch: dict, s_dec: torch.Tensor, last: bool) -> dict[str, float]:
    """Real (the decoder's target) vs fake (the student's decode), conditioned on the same latents;
    no step (and no losses) while the adversarial term is off."""
    if not run.adv_on:
        return {}
    latents = batch["latents"]
    with synced(run, run.disc, last):
        with run.acc.autocast():
            images = torch.cat([batch["target"], s_dec.detach()])
            logits = run.disc(images, torch.cat([latents, latents])).float()
        real, fake = logits.chunk(2)
        d_loss = discriminator_loss(real, fake, run.cfg.adv_loss)
        run.acc.backward(d_loss / run.cfg.grad_accum)
    return {"d": d_loss.item()}


def optimizer_step(run: Run) -> None:
    """Clip, step, zero the gradients, advance the schedules, update the EMA."""
    cfg = run.cfg
    if cfg.grad_clip:
        run.acc.clip_grad_norm_(run.student.parameters(), cfg.grad_clip)
    run.opt_g.step()
    run.opt_g.zero_grad(set_to_none=True)
    run.sched_g.step()
    if run.disc is not None:
        if run.adv_on:
            run.opt_d.step()
            run.sched_d.step()
        run.opt_d.zero_grad(set_to_none=True)
    if run.ema is not None:  # warm-up: early on the EMA follows the fresh weights closely
        ema_update(run.ema, run.raw_student, min(cfg.ema, (1 + run.step) / (10 + run.step)))
    run.bar.update(1)


def log_eval_checkpoint(run: Run, losses: dict[str, float], callback) -> None:
    """Every --log-every steps a metrics row, every --eval-every the hold-out numbers, every
    --ckpt-every a checkpoint; all three at the last step."""
    cfg, step = run.cfg, run.step
    final = step == cfg.steps
    row = {"step": step}
    if step % cfg.log_every == 0 or final:
        rate = run.images_seen / max(time.time() - run.t_window, 1e-9)
        run.bar.set_postfix({**{k: f"{v:.4f}" for k, v in losses.items()}, "img/s": f"{rate:.1f}"})
        row.update({**{f"loss_{k}": v for k, v in losses.items()}, "images_per_s": rate,
                    "lr": run.sched_g.get_last_lr()[0], "skipped_files": len(run.skipped)})
    if step % cfg.eval_every == 0 or final:
        row.update(run.evaluate())
    if len(row) > 1 and run.main:
        run.log.add(row)
        run.tb.add(row, step)
    if step % cfg.log_every == 0 or final:
        run.images_seen, run.t_window = 0, time.time()  # the next window leaves the evaluation out
    if callback is not None:
        callback(step, losses)
    if step % cfg.ckpt_every == 0 or final:
        save_checkpoint(run)


def should_stop(run: Run, flag: StopFlag) -> bool:
    """The stop vote: Ctrl-C / SIGTERM on any process, or the time limit, stops every process at this
    step, after a checkpoint."""
    cfg = run.cfg
    asked = flag.stop
    out_of_time = bool(cfg.time_limit) and time.time() - run.t_start > cfg.time_limit
    if run.world > 1:  # every process stops at the same step
        votes = run.acc.reduce(torch.tensor([float(asked), float(out_of_time)], device=run.acc.device), "sum")
        asked, out_of_time = votes[0].item() > 0, votes[1].item() > 0
    if not (asked or out_of_time) or run.step >= cfg.steps:
        return False
    save_checkpoint(run)
    run.stopped = asked
    if out_of_time and not asked and run.main and run.step % cfg.eval_every:
        run.log.add({"step": run.step, **run.evaluate()})  # the curve ends where training did
    return True


def finish(run: Run) -> dict:
    """The report; unless stopped early, the trained student (EMA weights when used) in every format."""
    from accelerate.utils import gather_object
    run.bar.close()
    final = run.final_model()
    digests = gather_object([weights_digest(run.raw_student)])
    report = {"step": run.step, "stopped_early": run.stopped, "processes": run.world,
              "seconds": run.seconds(), "skipped_files": sorted(run.skipped), "replica_digests": digests,
              "replicas_identical": len(set(digests)) == 1}
    if not run.stopped:
        report["eval"] = evaluate(final, run.teacher, run.holdout)[0]
        rates = sorted(float(r["images_per_s"]) for r in run.log.rows if r.get("images_per_s"))
        report["images_per_s_median"] = rates[len(rates) // 2] if rates else None
    if run.main:
        if not run.stopped:
            report["files"] = [str(p) for p in save_student(final, run.out / "student", run.cfg.save_formats)]
            with contextlib.suppress(ImportError):
                plot_curve(run.out / "metrics.csv", run.out / "learning_curve.png")
        with atomic_path(run.out / "report.json") as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        run.tb.close()
    run.acc.wait_for_everyone()
    run.acc.end_training()
    return report
