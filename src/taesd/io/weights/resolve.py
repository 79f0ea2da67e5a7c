"""Where a variant's weights come from, in order: an explicit path -> the folder in ``$TAESD_WEIGHTS``
-> the download cache -> a download from the variant's published sources (preferred first; the hub's
diffusers folders and combined files, the GitHub .pth files); and the checked state dict of one part.

``source`` ("hub" | "github") keeps only that host's files; ``revision`` pins the first remaining
source (a hub revision, or a GitHub commit), and then only that one is tried.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from taesd.errors import TaesdError
from taesd.io.weights import download
from taesd.io.weights.formats import DIFFUSERS_WEIGHT_NAMES, WEIGHTS_ENV, StateDict, WeightSource, read_source
from taesd.io.weights.identify import describe, identify
from taesd.registry import Variant, WeightFile, get_variant

SOURCES = ("hub", "github")


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


def sources_for(variant: str | Variant, part: str | None = None, source: str | None = None,
                revision: str | None = None) -> list[WeightFile]:
    """The published files of ``variant`` (holding ``part``) on ``source``, preferred first; with a
    ``revision``, the first of them pinned to it."""
    v = get_variant(variant)
    if source is not None and source not in SOURCES:
        raise TaesdError(f"unknown source {source!r}; use 'hub' or 'github'")
    found = [s for s in v.sources if (part is None or part in s.parts) and source in (None, s.host)]
    if not found and source is not None:
        hosts = sorted({s.host for s in v.sources if part is None or part in s.parts})
        raise TaesdError(f"{v.name} has no {part or 'weights'} on the {source}; its sources: "
                         f"{', '.join(hosts) or 'none'}")
    return [found[0].at(revision)] if revision and found else found


def find_weights(variant: str | Variant, part: str, weights=None, revision: str | None = None,
                 source: str | None = None, fetch: bool = True) -> Path:
    """Where the weights of one part come from: explicit path -> $TAESD_WEIGHTS -> cache -> download
    (``fetch=False``: no download)."""
    v = get_variant(variant)
    if weights is not None:
        return _explicit(v, part, weights)
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        found = _from_folder(Path(env), v, part)
        if found is not None:
            return found
    candidates = sources_for(v, part, source, revision)
    for src in candidates:
        path = download.cached(src)
        if path is not None:
            return download.location(src, path)
    if not fetch or download.offline() or not candidates:
        raise not_found(v, part, env, candidates, None if fetch else "not downloaded")
    failures = []
    for src in candidates:
        try:
            return download.location(src, download.fetch(src))
        except download.DownloadFailed as e:   # a network failure: the next source may work
            failures.append(str(e))
    raise TaesdError(f"no weights found for the {v.name} {part}: " + "; then ".join(failures))


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
            raise TaesdError(f"no {v.name} {part} weights in {p}: expected {v.name}_{part}.pth "
                             f"(or .safetensors, or a diffusers folder {v.name}/)")
        return found
    return p


def not_found(v: Variant, part: str, env: str | None, candidates: list[WeightFile],
              why: str | None = None) -> TaesdError:
    """One line: the file to fetch and the folder to put it in."""
    why = why or (f"downloads are off ({download.offline()})" if download.offline() else "it has no source")
    name = v.part_file(part)
    github = next((s for s in candidates if s.host == "github"), None)
    if github is not None:
        fetch, folder = download.url_of(github), download.folder_for(github)
        name = github.filename
    elif candidates:
        fetch, folder = download.url_of(candidates[0]), None
        name = candidates[0].filename
    else:
        fetch, folder = None, None
    where = [str(folder)] if folder else []
    where.append(f"${WEIGHTS_ENV} ({env})" if env else f"a folder named by ${WEIGHTS_ENV}")
    src = f" ({fetch})" if fetch else ""
    return TaesdError(f"no weights found for the {v.name} {part}: put {name}{src} in {' or '.join(where)}, "
                      f"or pass weights=PATH; {why}")


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
