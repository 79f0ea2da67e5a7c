"""Students: the networks being trained, either a registry architecture or a custom width/depth.

A registry student (``arch="taef2"``) is exactly ``taesd.create("taef2")``: once trained it saves in
every weight format and loads with ``taesd.load``. A custom student (``arch="custom"``) is the base
8x design with ``width`` channels and ``depth`` blocks per stage (published: width 64, depth 3);
it saves as one safetensors file with its shape in the metadata (``load_student`` reads it back).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from taesd.errors import TaesdError
from taesd.io.files import atomic_path
from taesd.io.weights.formats import FORMATS, save_weights
from taesd.model import create
from taesd.nn.arch import base_decoder, base_encoder
from taesd.registry import PARTS, VARIANTS, Arch, get_variant

CUSTOM_FILE = "student.safetensors"


class Student(nn.Module):
    """Encoder and/or decoder being trained. ``forward(images, teacher_latents)`` runs what exists:
    the encoder on the images, the decoder on the *teacher's* latents (the published recipe)."""

    def __init__(self, encoder: nn.Module | None, decoder: nn.Module | None, config: dict):
        super().__init__()
        self.encoder, self.decoder, self.config = encoder, decoder, config

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in PARTS if getattr(self, p) is not None)

    def forward(self, images: torch.Tensor | None, teacher_latents: torch.Tensor | None):
        latents = self.encoder(images) if self.encoder is not None and images is not None else None
        decoded = (self.decoder(teacher_latents)
                   if self.decoder is not None and teacher_latents is not None else None)
        return latents, decoded


def build_student(arch: str, parts=("encoder", "decoder"), latent_channels: int | None = None,
                  width: int = 64, depth: int = 3, seed: int | None = None) -> Student:
    if seed is not None:
        torch.manual_seed(seed)
    parts = tuple(parts)
    if arch in VARIANTS:
        v = get_variant(arch)
        if latent_channels is not None and latent_channels != v.latent_channels:
            raise TaesdError(f"the teacher has {latent_channels}-channel latents but {v.name} has "
                             f"{v.latent_channels}; pick a student with {latent_channels} channels "
                             f"or --student custom")
        m = create(v, parts)
        return Student(m.encoder, m.decoder, {"arch": v.name, "parts": list(parts)})
    if arch != "custom":
        raise TaesdError(f"unknown student {arch!r}; use a variant name ({', '.join(VARIANTS)}) or 'custom'")
    if latent_channels is None:
        raise TaesdError("a custom student needs the latent channel count (from the teacher)")
    if width < 1 or depth < 1:
        raise TaesdError("--width and --depth must be at least 1")
    enc = base_encoder(latent_channels, width, depth) if "encoder" in parts else None
    dec = base_decoder(latent_channels, width, depth) if "decoder" in parts else None
    return Student(enc, dec, {"arch": "custom", "parts": list(parts), "latent_channels": latent_channels,
                              "width": width, "depth": depth})


def part_state_dicts(student: Student) -> dict[str, dict[str, torch.Tensor]]:
    return {p: {k: t.detach().cpu().contiguous() for k, t in getattr(student, p).state_dict().items()}
            for p in student.parts}


def save_student(student: Student, out: str | os.PathLike, formats=None) -> list[Path]:
    """Write the trained student: a registry one in every format it fits (pth, safetensors,
    comfyui and, for base-architecture variants, diffusers), a custom one as ``student.safetensors``."""
    out = Path(out)
    parts = part_state_dicts(student)
    arch = student.config["arch"]
    if arch == "custom":
        tensors = {f"{p}.{k}": t for p, sd in parts.items() for k, t in sd.items()}
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / CUSTOM_FILE) as tmp:
            meta = {"format": "taesd-student", "config": json.dumps(student.config)}
            save_file(tensors, str(tmp), metadata=meta)
        return [out / CUSTOM_FILE]
    v = get_variant(arch)
    written = []
    for fmt in formats or FORMATS:
        if fmt == "diffusers" and (v.arch != Arch.BASE or len(parts) < 2):
            continue  # AutoencoderTiny holds base-architecture encoder+decoder pairs only
        dest = {"diffusers": out / "diffusers", "comfyui": out / f"{v.name}.safetensors"}.get(fmt, out)
        written += save_weights(parts, v, fmt, dest)
    return written


def load_student(path: str | os.PathLike, device=None) -> Student:
    """A custom student written by ``save_student`` (registry students load with ``taesd.load``)."""
    path = Path(path)
    if path.is_dir():
        path = path / CUSTOM_FILE
    if not path.is_file():
        raise TaesdError(f"no trained student at {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "taesd-student":
            raise TaesdError(f"{path} is not a custom student file; registry students load with taesd.load")
        config = json.loads(meta["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    student = build_student("custom", config["parts"], config["latent_channels"], config["width"],
                            config["depth"])
    for p in student.parts:
        prefix = p + "."
        part = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        getattr(student, p).load_state_dict(part)
    return student.to(device).eval()


@torch.no_grad()
def ema_update(ema: Student, model: Student, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    ema_p, model_p = list(ema.parameters()), [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1 - decay)


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's state dict (names and bytes): equal digests mean identical weights."""
    h = hashlib.sha256()
    for k, t in module.state_dict().items():
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
