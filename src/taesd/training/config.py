"""The options of a training run: one dataclass, every option documented where it is declared.

Each field's metadata carries what the command line (``taesd train``, built from it) and the checks
need: ``help``; ``group`` (the ``--help`` section; no group: not a command-line option);
``choices``; bounds ``min`` / ``max`` (inclusive) and ``above`` / ``below`` (exclusive); ``metavar``; and
``fixed`` (part of the run's architecture: ``--resume`` must repeat the checkpoint's value). A
field without a default is a required option. ``TrainConfig(...)`` checks every value once, on
construction, and raises a one-line ``TaesdError``; nothing else re-checks them.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, Field, dataclass, field, fields

from taesd.errors import TaesdError
from taesd.io.weights.formats import FORMATS
from taesd.registry import VARIANTS


def option(default=MISSING, help: str = "", group: str | None = None, **meta) -> Field:
    """A config field: ``default`` (a list default is copied per instance) plus its metadata."""
    meta = {"help": help, "group": group, **meta}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # data
    data: str = option(help="folder of training images (corrupt files are skipped and counted)", group="data")
    holdout: list[str] = option([], "hold-out images/folders for evaluation (keep them out of --data)",
                                "data")
    crop: int = option(128, "random crop size (pixels) for training", "data", min=1)
    final_crop: int = option(256, "crop size for the last --final-steps steps (the recipe: 256)", "data",
                             min=1)
    final_steps: int = option(0, "train the last N steps at --final-crop", "data", min=0)
    colour_aug: float = option(0.05, "fraction of samples given a random colour matrix", "data", min=0, max=1)
    workers: int = option(0, "data loader worker processes", "data", min=0)
    cache_latents: bool = option(False, "run the teacher once per image, keep its latents in "
                                        "OUT/latent_cache (crops align to the latent grid; no flip/colour "
                                        "augmentation)", "data")
    # teacher and student
    teacher: str = option("taef2", "TAESD variant name (e.g. taef2) or a local diffusers autoencoder folder",
                          "teacher and student", fixed=True)
    teacher_weights: str | None = option(None, "weight file/folder of a TAESD teacher "
                                               "(default: $TAESD_WEIGHTS)", "teacher and student")
    scale: float | None = option(None, "latent scale: taesd = (raw - shift) * scale (diffusers teachers)",
                                 "teacher and student")
    shift: float | None = option(None, "latent shift (diffusers teachers)", "teacher and student")
    family: str | None = option(None, "take --scale/--shift from this registry variant (e.g. taesdxl, taef1)",
                                "teacher and student", choices=list(VARIANTS), metavar="VARIANT")
    student: str = option("custom", "student architecture: a variant name (same latent channels) or 'custom'",
                          "teacher and student", choices=[*VARIANTS, "custom"], metavar="ARCH", fixed=True)
    width: int = option(64, "channels of a custom student (published: 64)", "teacher and student",
                        min=1, fixed=True)
    depth: int = option(3, "blocks per stage of a custom student (published: 3)", "teacher and student",
                        min=1, fixed=True)
    parts: str = option("both", "train both parts, or only the encoder / decoder", "teacher and student",
                        choices=["both", "encoder", "decoder"], fixed=True)
    # optimisation (the published recipe's numbers)
    steps: int = option(1000, "optimizer steps", "optimisation", min=1)
    batch: int = option(16, "images per process per micro-batch", "optimisation", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", "optimisation", min=1)
    lr: float = option(3e-4, "Adam learning rate", "optimisation", above=0)
    betas: tuple[float, float] = option((0.9, 0.9), "Adam betas", "optimisation", min=0, max=1,
                                        metavar=("B1", "B2"))
    warmup: int = option(0, "linear learning-rate warm-up steps", "optimisation", min=0)
    lr_decay: str = option("none", "none, or cosine decay to 10% of --lr at the last step", "optimisation",
                           choices=["none", "cosine"])
    grad_clip: float = option(1.0, "clip the student's gradient norm (0: off)", "optimisation", min=0)
    ema: float = option(0.0, "EMA decay of the student, e.g. 0.999 (0: off); the saved student is the EMA",
                        "optimisation", min=0, below=1)
    mixed_precision: str = option("no", "no, fp16 or bf16", "optimisation", choices=["no", "fp16", "bf16"])
    cpu: bool = option(False, "run on the CPU even if a GPU is present", "optimisation")
    threads: int = option(0, "CPU threads per process (0: torch's default; 1 is fastest on a busy CPU)",
                          "optimisation", min=0)
    seed: int = option(0, "seed of weights and data order", "optimisation", min=0)
    # losses
    latent_weight: float = option(1.0, "weight of the encoder's latent MSE", "losses", min=0)
    mse_weight: float = option(1.0, "weight of the decoder's image MSE", "losses", min=0)
    l1_weight: float = option(0.0, "weight of the decoder's image L1", "losses", min=0)
    decoder_target: str = option("image", "decoder learns the real image (recipe) or the teacher's decode",
                                 "losses", choices=["image", "teacher"])
    adv_weight: float = option(0.1, "adversarial weight (0: off)", "losses", min=0)
    adv_loss: str = option("hinge", "hinge or lsgan", "losses", choices=["hinge", "lsgan"])
    adv_adaptive: bool = option(True, "scale the adversarial gradient to the reconstruction gradient "
                                      "(--adv-adaptive 0: a fixed weight)", "losses")
    adv_start: int = option(0, "step at which the adversarial term starts", "losses", min=0)
    disc_lr: float = option(3e-4, "discriminator learning rate", "losses", above=0)
    disc_width: int = option(64, "discriminator channels", "losses", min=1, fixed=True)
    # run
    out: str = option("runs/taesd", "output folder: checkpoint, metrics.csv, tensorboard/, samples/, "
                                    "student/", "run")
    eval_crop: int = option(256, "size of the hold-out centre crops", "run", min=1)
    eval_every: int = option(100, "evaluate every N steps", "run", min=1)
    ckpt_every: int = option(200, "checkpoint every N steps (also on Ctrl-C and at the end)", "run", min=1)
    log_every: int = option(10, "log every N steps", "run", min=1)
    resume: bool = option(False, "continue from OUT/checkpoint.pt", "run")
    overwrite: bool = option(False, "start over in an OUT that holds a taesd run: deletes only the files "
                                    "taesd wrote there (checkpoint, logs, its samples, tensorboard events "
                                    "and student weights); your own files in samples/, student/ or "
                                    "tensorboard/ stay, and so does the latent cache", "run")
    time_limit: float = option(0.0, "stop after this many seconds and finish normally (0: no limit)", "run",
                               min=0)
    save_formats: list[str] | None = option(None, "weight formats of the trained student (default: all "
                                                  "it fits)", "run", choices=list(FORMATS))
    progress: bool = option(True, "show a progress bar")  # no group: the command line always shows it

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if isinstance(self.holdout, str):  # one folder given as a string, not a list of them
            self.holdout = [self.holdout]
        if isinstance(self.save_formats, str):
            self.save_formats = [self.save_formats]
        for f in fields(self):
            check_value(f, getattr(self, f.name))
        if not self.data:
            raise TaesdError("no training data: pass --data FOLDER")
        if self.resume and self.overwrite:
            raise TaesdError("--resume continues the run in --out and --overwrite deletes it: "
                             "pass one of them")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_value(f: Field, value) -> None:
    """The field's choices and bounds (every element of a list or tuple)."""
    meta = f.metadata
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if v is None:
            continue
        if "choices" in meta and v not in meta["choices"]:
            raise TaesdError(f"{flag(f.name)} {v!r} is not one of: {', '.join(map(str, meta['choices']))}")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            raise TaesdError(f"{flag(f.name)} must be a finite number, not {v}")
        if "min" in meta and v < meta["min"]:
            raise TaesdError(f"{flag(f.name)} must be at least {meta['min']}, not {v}")
        if "max" in meta and v > meta["max"]:
            raise TaesdError(f"{flag(f.name)} must be at most {meta['max']}, not {v}")
        if "above" in meta and v <= meta["above"]:
            raise TaesdError(f"{flag(f.name)} must be above {meta['above']}, not {v}")
        if "below" in meta and v >= meta["below"]:
            raise TaesdError(f"{flag(f.name)} must be below {meta['below']}, not {v}")


def config_from_dict(d: dict) -> TrainConfig:
    unknown = set(d) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TaesdError(f"unknown training options: {', '.join(sorted(unknown))}")
    return TrainConfig(**d)


def crop_sizes(cfg: TrainConfig) -> set[int]:
    """Every crop size the run trains at."""
    return {cfg.crop, cfg.final_crop} if cfg.final_steps else {cfg.crop}


def crop_at(cfg: TrainConfig, step: int) -> int:
    """The crop size of ``step``: the last ``final_steps`` steps train at ``final_crop``."""
    return cfg.final_crop if cfg.final_steps and step >= cfg.steps - cfg.final_steps else cfg.crop


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The learning-rate multiplier of ``step``: linear warm-up, then constant or cosine to 10%."""
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    if cfg.lr_decay == "cosine":
        progress = min(1.0, step / max(1, cfg.steps - 1))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return warm
