"""taesd train: distil a tiny autoencoder from a teacher VAE (one CPU process or accelerate launch)."""
from __future__ import annotations

import json
import os
from dataclasses import fields

from taesd.cli.common import command_parser

# option -> help, grouped as --help shows them. Types and defaults come from TrainConfig.
GROUPS = {
    "data": {
        "data": "folder of training images (corrupt files are skipped and counted)",
        "holdout": "hold-out images/folders for evaluation (keep them out of --data)",
        "crop": "random crop size (pixels) for training",
        "final_crop": "crop size for the last --final-steps steps (the recipe: 256)",
        "final_steps": "train the last N steps at --final-crop",
        "colour_aug": "fraction of samples given a random colour matrix",
        "workers": "data loader worker processes",
        "cache_latents": "run the teacher once per image, keep its latents in OUT/latent_cache "
                         "(crops align to the latent grid; no flip/colour augmentation)",
    },
    "teacher and student": {
        "teacher": "TAESD variant name (e.g. taef2) or a local diffusers autoencoder folder",
        "teacher_weights": "weight file/folder of a TAESD teacher (default: $TAESD_WEIGHTS)",
        "scale": "latent scale: taesd = (raw - shift) * scale (diffusers teachers)",
        "shift": "latent shift (diffusers teachers)",
        "family": "take --scale/--shift from this registry variant (e.g. taesdxl, taef1)",
        "student": "student architecture: a variant name (same latent channels) or 'custom'",
        "width": "channels of a custom student (published: 64)",
        "depth": "blocks per stage of a custom student (published: 3)",
        "parts": "train both parts, or only the encoder / decoder",
    },
    "optimisation": {
        "steps": "optimizer steps", "batch": "images per process per micro-batch",
        "grad_accum": "micro-batches per optimizer step", "lr": "Adam learning rate",
        "betas": "Adam betas", "warmup": "linear learning-rate warm-up steps",
        "lr_decay": "none, or cosine decay to 10%% of --lr at the last step",
        "grad_clip": "clip the student's gradient norm (0: off)",
        "ema": "EMA decay of the student, e.g. 0.999 (0: off); the saved student is the EMA",
        "mixed_precision": "no, fp16 or bf16", "cpu": "run on the CPU even if a GPU is present",
        "threads": "CPU threads per process (0: torch's default; 1 is fastest on a busy CPU)",
        "seed": "seed of weights and data order",
    },
    "losses": {
        "latent_weight": "weight of the encoder's latent MSE",
        "mse_weight": "weight of the decoder's image MSE", "l1_weight": "weight of the decoder's image L1",
        "decoder_target": "decoder learns the real image (recipe) or the teacher's decode",
        "adv_weight": "adversarial weight (0: off)", "adv_loss": "hinge or lsgan",
        "adv_adaptive": "scale the adversarial gradient to the reconstruction gradient (1/0)",
        "adv_start": "step at which the adversarial term starts",
        "disc_lr": "discriminator learning rate", "disc_width": "discriminator channels",
    },
    "run": {
        "out": "output folder: checkpoint, metrics.csv, tensorboard/, samples/, student/",
        "eval_crop": "size of the hold-out centre crops", "eval_every": "evaluate every N steps",
        "ckpt_every": "checkpoint every N steps (also on Ctrl-C and at the end)",
        "log_every": "log every N steps", "resume": "continue from OUT/checkpoint.pt",
        "time_limit": "stop after this many seconds and finish normally (0: no limit)",
        "save_formats": "weight formats of the trained student (default: all it fits)",
    },
}
CHOICES = {"parts": ["both", "encoder", "decoder"], "lr_decay": ["none", "cosine"], "mixed_precision": ["no", "fp16", "bf16"],
           "decoder_target": ["image", "teacher"], "adv_loss": ["hinge", "lsgan"],
           "save_formats": ["pth", "safetensors", "diffusers", "comfyui"]}


def add_parser(sub):
    from taesd.training.loop import TrainConfig
    p = command_parser(
        sub, "train", "distil a tiny autoencoder from a teacher VAE",
        "taesd train --data photos/ --teacher taef2 --student custom --width 32 --steps 2000 --out runs/t",
        "Train a TAESD-style student on a folder of images: the encoder learns the teacher's latents "
        "(MSE), the decoder turns the teacher's latents back into images (MSE/L1 + latent-conditioned "
        "adversarial). Runs on one CPU process as is, or on many GPUs with `accelerate launch -m taesd "
        "train ...`. Ctrl-C saves a checkpoint; --resume continues bit-exactly. See docs/training.md.")
    defaults = {f.name: f.default if not callable(f.default_factory) else f.default_factory()
                for f in fields(TrainConfig)}
    for group, options in GROUPS.items():
        g = p.add_argument_group(group)
        for name, help in options.items():
            flag, default = "--" + name.replace("_", "-"), defaults[name]
            if isinstance(default, bool) and name != "adv_adaptive":
                g.add_argument(flag, action="store_true", help=help)
            elif name in ("holdout", "save_formats"):
                g.add_argument(flag, nargs="+", choices=CHOICES.get(name), default=default, help=help)
            elif name == "betas":
                g.add_argument(flag, nargs=2, type=float, default=default, metavar=("B1", "B2"), help=help)
            else:
                kind = int if isinstance(default, bool) else type(default) if default is not None else \
                    (float if name in ("scale", "shift") else str)
                g.add_argument(flag, type=kind, default=default, choices=CHOICES.get(name),
                               required=name == "data",
                               help=help if default in (None, "") else f"{help} (default: {default})")
    p.set_defaults(run=run)


def run(args) -> int:
    from taesd.training.loop import TrainConfig, config_from_dict, train
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    given["adv_adaptive"] = bool(given["adv_adaptive"])
    given["progress"] = True
    report = train(config_from_dict(given))
    if report.get("stopped_early"):
        print(f"stopped at step {report['step']}; checkpoint in {args.out}; continue with --resume")
        return 130
    if int(os.environ.get("RANK", "0")) == 0:  # one report, not one per process
        print(json.dumps({k: v for k, v in report.items() if k not in ("replica_digests",)}, indent=2))
    return 0
