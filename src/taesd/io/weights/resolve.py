"""Where a variant's weights come from, in order: an explicit path -> the folder in
``$TAESD_WEIGHTS`` -> the Hugging Face hub; and the checked state dict of one part."""
from __future__ import annotations

import json
import os
from pathlib import Path

from taesd.errors import TaesdError
from taesd.io.weights.formats import (DIFFUSERS_WEIGHT_NAMES, PUBLISHED_AT, WEIGHTS_ENV, StateDict,
                                      WeightSource, read_source)
from taesd.io.weights.identify import describe, identify
from taesd.registry import Variant, get_variant


def _candidates(folder: Path, v: Variant, part: str) -> list[Path]:
    n = v.name
    return [folder / f"{n}_{part}.pth", folder / f"{n}_{part}.safetensors",
            folder / n, folder / f"{n}.safetensors", folder / f"{n}_{part}.bin"]


def _from_folder(folder: Path, v: Variant, part: str) -> Path | None:
    if _is_diffusers(folder) and _folder_is_variant(folder, v):
        return folder
    for cand in _candidates(folder, v, part):
        if cand.is_file() or (cand.is_dir() and _is_diffusers(cand)):
            return cand
    return None


def _is_diffusers(folder: Path) -> bool:
    return any((folder / name).is_file() for name in DIFFUSERS_WEIGHT_NAMES)


def _folder_is_variant(folder: Path, v: Variant) -> bool:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return True  # decided later from the tensors
    return int(cfg.get("latent_channels", v.latent_channels)) == v.latent_channels


def _hub_source(v: Variant):
    return next((s for s in v.sources if s.host == "hub"), None)


def _from_hub(v: Variant, revision: str | None) -> Path | None:
    src = _hub_source(v)
    if src is None:
        return None
    try:
        from huggingface_hub import hf_hub_download
        extra = ["config.json"] if src.layout == "diffusers" else []
        paths = [hf_hub_download(src.repo, f, revision=revision or src.revision) for f in [src.filename, *extra]]
    except Exception:
        return None
    return Path(paths[0]).parent if src.layout == "diffusers" else Path(paths[0])


def find_weights(variant: str | Variant, part: str, weights=None, revision: str | None = None) -> Path:
    """Where the weights of one part come from, in order: explicit path -> $TAESD_WEIGHTS -> hub."""
    v = get_variant(variant)
    if weights is not None:
        if isinstance(weights, dict):
            weights = weights.get(part)
            if weights is None:
                raise TaesdError(f"no {part} weights given for {v.name}")
        p = Path(weights)
        if not p.exists():
            raise TaesdError(f"weights path {p} does not exist")
        if p.is_dir():
            found = _from_folder(p, v, part)
            if found is None:
                raise TaesdError(f"no {v.name} {part} weights in {p}: expected {v.name}_{part}.pth "
                                 f"(or .safetensors, or a diffusers folder {v.name}/)")
            return found
        return p
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        found = _from_folder(Path(env), v, part)
        if found is not None:
            return found
    found = _from_hub(v, revision)
    if found is not None:
        return found
    where = f"${WEIGHTS_ENV} ({env})" if env else f"a folder and set {WEIGHTS_ENV} to it"
    hub = f", or allow the download from {_hub_source(v).repo}" if _hub_source(v) else ""
    raise TaesdError(f"no weights found for the {v.name} {part}: put {v.encoder_file if part == 'encoder' else v.decoder_file} "
                     f"(from {PUBLISHED_AT}) in {where}, or pass weights=PATH{hub}")


def load_part(variant: str | Variant, part: str, path: Path, source: WeightSource | None = None
              ) -> tuple[StateDict, WeightSource]:
    """The state dict of ``part`` from ``path``, checked against the variant's shapes."""
    v = get_variant(variant)
    source = source or read_source(path)
    for held, sd in source.parts.items():
        if v.name not in identify(sd, held):
            raise TaesdError(f"{path} holds {describe(sd, held)}; {v.name} needs a "
                             f"{v.latent_channels}-channel {held} ({v.arch} architecture)")
    if part not in source.parts:
        held = " and ".join(f"{describe(sd, p)}" for p, sd in source.parts.items())
        raise TaesdError(f"{path} holds {held}, not the {v.name} {part} it was asked for; "
                         f"pass the {part} file too")
    sd = source.parts[part]
    return sd, source
