"""The one resolver: which file holds each part of a variant. ``taesd.load``, ``taesd convert``,
``taesd info`` and ``TaesdVAE.from_pretrained`` ask here (``taesd download`` asks its network end,
``download.fetch_parts``, which this module also uses).

Order per part: the given weights (files, a folder, a list, {part: path}) -> the folder in
``$TAESD_WEIGHTS`` -> the download cache -> a download from the variant's published sources
(preferred first; ``fetch=False``: none). ``source`` ("hub" | "github") keeps only that host's files;
``revision`` pins the first remaining source (a hub revision, or a GitHub commit).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from taesd import settings
from taesd.errors import TaesdError
from taesd.io.weights import download
from taesd.io.weights.download import SOURCES, sources_for  # noqa: F401  (re-exported)
from taesd.io.weights.identify import describe, identify
from taesd.io.weights.read import DIFFUSERS_WEIGHT_NAMES, StateDict, WeightSource
from taesd.io.weights.source import read_source
from taesd.registry import PARTS, Variant, get_variant, normalize_parts


def resolve(variant: str | Variant, weights=None, parts=None, revision: str | None = None,
            source: str | None = None, fetch: bool = True) -> dict[str, WeightSource]:
    """{part: the read WeightSource holding it}. ``parts`` None: both, or what given files hold."""
    v = get_variant(variant)
    given: dict[str, WeightSource] = {}
    if isinstance(weights, (list, tuple)):
        for w in weights:
            src = read_source(w)
            for p in src.parts:
                given.setdefault(p, src)
        if parts is None:
            parts = tuple(p for p in PARTS if p in given)
    elif isinstance(weights, (str, os.PathLike)) and Path(weights).is_file() and parts is None:
        src = read_source(weights)
        given = dict.fromkeys(src.parts, src)
        parts = tuple(p for p in PARTS if p in src.parts)
    parts = normalize_parts(PARTS if parts is None else parts)
    by_path: dict[Path, WeightSource] = {s.path: s for s in given.values()}
    out: dict[str, WeightSource] = {}
    missing = []
    for part in parts:
        if part in given:
            out[part] = given[part]
        elif isinstance(weights, (list, tuple)):
            raise TaesdError(f"none of the given files holds the {v.name} {part}")
        elif weights is not None:
            path = _explicit(v, part, weights)
            out[part] = by_path.setdefault(path, read_source(path))
        elif (path := _from_env(v, part)) is not None:
            out[part] = by_path.setdefault(path, read_source(path))
        else:
            missing.append(part)
    if missing:
        for part, (src, path) in download.fetch_parts(v, missing, source, revision, fetch).items():
            where = download.location(src, path)
            out[part] = by_path.setdefault(where, read_source(where))
    return {p: out[p] for p in parts}


def find_weights(variant: str | Variant, part: str, weights=None, revision: str | None = None,
                 source: str | None = None, fetch: bool = True) -> Path:
    """The path ``resolve`` reads ``part`` from."""
    return resolve(variant, weights, part, revision, source, fetch)[part].path


def _from_env(v: Variant, part: str) -> Path | None:
    env = settings.weights_path()
    if env is None:
        return None
    if env.is_file():
        return env if part in read_source(env).parts else None
    return _from_folder(env, v, part)


def _candidates(folder: Path, v: Variant, part: str) -> list[Path]:
    n = v.name
    return [folder / v.part_file(part), folder / f"{n}_{part}.safetensors",
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


def _explicit(v: Variant, part: str, weights) -> Path:
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
            raise TaesdError(f"no {v.name} {part} weights in {p}: expected {v.part_file(part)} "
                             f"(or .safetensors, or a diffusers folder {v.name}/)")
        return found
    return p


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
    return source.parts[part], source
