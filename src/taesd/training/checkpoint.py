"""The checkpoint: one dict with named keys, written in one place (``save_checkpoint``), read back
and checked in one place (``read_checkpoint`` + ``check_resumable``).

It holds everything that decides the rest of a run, so a resumed run ends bit-identical to one that
never stopped: the step, the config, student / EMA / discriminator weights, both optimizers and
schedulers, every process's RNG states, the skipped files and the seconds trained so far. Only
tensors, numbers, strings and containers of them are stored, so it loads with
``torch.load(weights_only=True)``: a checkpoint file cannot run code.
"""
from __future__ import annotations

import random
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from taesd.errors import TaesdError
from taesd.io.files import atomic_path
from taesd.training.config import TrainConfig, flag

CHECKPOINT = "checkpoint.pt"
KEYS = ("step", "config", "student", "ema", "disc", "opt_g", "sched_g", "opt_d", "sched_d", "rng", "skipped",
        "seconds")


def rng_states() -> dict:
    """This process's torch, Python, NumPy and CUDA generator states (NumPy's as tensors)."""
    np_state = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                      "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                      "gauss": float(np_state["gauss"])},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    n = s["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]}})
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(run) -> None:
    """Write ``run``'s state to OUT/checkpoint.pt (atomically; every process joins the RNG gather)."""
    from accelerate.utils import gather_object
    rng = gather_object([rng_states()])
    if run.main:
        has_disc = run.raw_disc is not None
        checkpoint = {
            "step": run.step,
            "config": asdict(run.cfg),
            "student": run.raw_student.state_dict(),
            "ema": run.ema.state_dict() if run.ema is not None else None,
            "disc": run.raw_disc.state_dict() if has_disc else None,
            "opt_g": run.opt_g.state_dict(),
            "sched_g": run.sched_g.state_dict(),
            "opt_d": run.opt_d.state_dict() if has_disc else None,
            "sched_d": run.sched_d.state_dict() if has_disc else None,
            "rng": rng,
            "skipped": sorted(run.skipped),
            "seconds": run.seconds(),
        }
        with atomic_path(run.out / CHECKPOINT) as tmp:
            torch.save(checkpoint, tmp)
    run.acc.wait_for_everyone()


def restore(run, checkpoint: dict) -> None:
    """Put a checked checkpoint's state back into ``run`` (its models built from the same options)."""
    try:
        run.raw_student.load_state_dict(checkpoint["student"])
        if run.ema is not None:
            run.ema.load_state_dict(checkpoint["ema"])
        if run.raw_disc is not None:
            run.raw_disc.load_state_dict(checkpoint["disc"])
            run.opt_d.load_state_dict(checkpoint["opt_d"])
            run.sched_d.load_state_dict(checkpoint["sched_d"])
        run.opt_g.load_state_dict(checkpoint["opt_g"])
        run.sched_g.load_state_dict(checkpoint["sched_g"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise TaesdError(f"--resume: the checkpoint in {run.out} does not fit this run's networks "
                         f"({str(e).splitlines()[0][:200]}); resume with its options or --overwrite") from e
    set_rng_states(checkpoint["rng"][min(run.acc.process_index, len(checkpoint["rng"]) - 1)])
    run.step, run.seconds_before = checkpoint["step"], checkpoint["seconds"]
    run.skipped = set(checkpoint["skipped"])


def read_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``, or a one-line error if it is missing, truncated or not ours."""
    if not path.is_file():
        raise TaesdError(f"--resume: no checkpoint at {path}; start without --resume")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a file of zeros, ...: all the same to the user
        if "Weights only load failed" in str(e):
            raise TaesdError(f"--resume: {path} holds Python objects a safe load refuses (not a checkpoint "
                             f"of this taesd version); start over with --overwrite") from e
        raise TaesdError(f"--resume: {path} is truncated or corrupt ({type(e).__name__}); restore it, "
                         f"or start over with --overwrite") from e
    missing = [k for k in KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise TaesdError(f"--resume: {path} is not a taesd training checkpoint (no {', '.join(missing)}); "
                         f"start over with --overwrite")
    return checkpoint


def check_resumable(cfg: TrainConfig, checkpoint: dict, path: Path) -> None:
    """The options that shape the run's networks must be the checkpoint's: name the first that is not."""
    old = checkpoint["config"]
    for f in fields(TrainConfig):
        if f.metadata.get("fixed") and f.name in old and old[f.name] != getattr(cfg, f.name):
            raise TaesdError(f"--resume: {flag(f.name)} is {getattr(cfg, f.name)!r} but the checkpoint "
                             f"{path} was trained with {old[f.name]!r}; pass {flag(f.name)} {old[f.name]} "
                             f"or start over with --overwrite")
    # EMA and the discriminator exist or not by a number being zero: compare presence, not the number.
    for name, wanted, present in (("ema", cfg.ema > 0, checkpoint["ema"] is not None),
                                  ("adv_weight", cfg.adv_weight > 0 and cfg.parts != "encoder",
                                   checkpoint["disc"] is not None)):
        if wanted != present:
            state = "with" if present else "without"
            raise TaesdError(f"--resume: the checkpoint {path} was trained {state} {flag(name)} "
                             f"({old.get(name)!r}, now {getattr(cfg, name)!r}); pass {flag(name)} "
                             f"{old.get(name)} or start over with --overwrite")
