"""The hold-out set and the numbers measured on it: the student against the teacher's decode.

The hold-out images are centre crops (``eval_crop`` square, on the latent grid) of ``--holdout``
images, else of the first two training images; the teacher's latents and decode of them are
computed once per run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from taesd.errors import TaesdError
from taesd.evaluation.metrics import psnr
from taesd.io.images import load_image
from taesd.io.inputs import IMAGE_SUFFIXES, expand_inputs
from taesd.training.students import Student


@dataclass
class Holdout:
    images: torch.Tensor    # N x 3 x S x S in [0, 1]
    latents: torch.Tensor   # the teacher's latents of them
    decoded: torch.Tensor   # the teacher's decode of those latents

    @classmethod
    def build(cls, holdout: list[str], train_files: list, eval_crop: int, teacher, device) -> "Holdout":
        images = holdout_images(holdout, train_files, eval_crop, teacher.downscale).to(device)
        latents = teacher.encode(images)
        return cls(images, latents, teacher.decode(latents))


def holdout_images(holdout: list[str], train_files: list, eval_crop: int, multiple: int) -> torch.Tensor:
    """Centre crops of the hold-out images, else of the first two readable training images."""
    files = expand_inputs(holdout, IMAGE_SUFFIXES) if holdout else train_files
    out = []
    for f in files:
        if len(out) == 2 and not holdout:
            break
        try:
            img = load_image(f, 3)
        except TaesdError:
            continue  # unreadable: the training stream skips and counts it
        c = min(eval_crop, *img.shape[-2:])
        c -= c % multiple
        top, left = (img.shape[-2] - c) // 2, (img.shape[-1] - c) // 2
        out.append(img[:, top:top + c, left:left + c])
    if not out or min(o.shape[-1] for o in out) < multiple:
        raise TaesdError(f"no hold-out image of at least {multiple} x {multiple} pixels could be read")
    size = min(o.shape[-1] for o in out)
    return torch.stack([o[:, :size, :size] for o in out])


@torch.no_grad()
def evaluate(student: Student, teacher, holdout: Holdout) -> tuple[dict, list]:
    """Hold-out numbers (the student against the teacher's decode and the real image) and the
    rows of the sample grid (image, teacher decode, student decoder, student round trip)."""
    student.eval()
    images, t_lat, t_dec = holdout.images, holdout.latents, holdout.decoded
    rows, m = [images, t_dec], {}
    if student.decoder is not None:
        dec = student.decoder(t_lat).float().clamp(0, 1)
        m["psnr_decoder_vs_teacher"] = psnr(dec, t_dec).mean().item()
        m["psnr_decoder_vs_image"] = psnr(dec, images).mean().item()
        rows.append(dec)
    if student.encoder is not None:
        s_lat = student.encoder(images).float()
        m["latent_mse"] = F.mse_loss(s_lat, t_lat).item()
        decoder = student.decoder if student.decoder is not None else teacher.decode
        rt = decoder(s_lat).float().clamp(0, 1)
        m["psnr_roundtrip_vs_teacher"] = psnr(rt, t_dec).mean().item()
        m["psnr_roundtrip_vs_image"] = psnr(rt, images).mean().item()
        rows.append(rt)
    student.train()
    return m, rows
