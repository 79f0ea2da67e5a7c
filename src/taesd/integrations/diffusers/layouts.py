"""Where ``TaesdVAE.from_pretrained`` finds a variant's weights, and which variant they are.

Accepted: a TaesdVAE folder (config.json with ``taesd_variant``), a diffusers AutoencoderTiny
folder, one weight file (a combined file such as taef2.safetensors with diffusers-style keys, or
one of our per-part files), a folder of our per-part files (``<name>_encoder.pth`` ...), or a hub
repo of any of those (``madebyollin/taef2``). The variant comes from, in order: the caller,
config.json's ``taesd_variant``, the tensors' shapes when they fit one variant only, the file,
folder or repo name.
"""
from __future__ import annotations

import json
from pathlib import Path

from taesd.errors import TaesdError
from taesd.io.weights.formats import DIFFUSERS_WEIGHTS, read_source
from taesd.io.weights.identify import identify
from taesd.registry import VARIANTS, get_variant

CONFIG_NAME = "config.json"


def name_hint(name: str) -> str | None:
    """The variant a file, folder or repo name speaks of: 'madebyollin/taesdxl' -> 'taesdxl'."""
    stem = Path(str(name).rstrip("/")).name.lower().removesuffix(".safetensors").removesuffix(".pth")
    hits = [v for v in VARIANTS if stem == v or stem.startswith(f"{v}_") or stem.startswith(f"{v}-")]
    return max(hits, key=len) if hits else None


def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / CONFIG_NAME).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise TaesdError(f"cannot read {folder / CONFIG_NAME} ({e}); the folder is damaged") from e


def _from_tensors(path: Path, hint: str | None) -> str:
    src = read_source(path)
    fits = None
    for part, sd in src.parts.items():
        names = set(identify(sd, part))
        fits = names if fits is None else fits & names
    fits = [v for v in VARIANTS if v in (fits or set())]
    if len(fits) == 1:
        return fits[0]
    if hint in fits:
        return hint
    if not fits:
        raise TaesdError(f"{path} holds no TAESD weights of one variant; pass a TAESD weight file or folder")
    raise TaesdError(f"{path} fits {' and '.join(fits)} (same shapes, different latent spaces); "
                     f"pass taesd_variant= (one of {', '.join(fits)})")


def _local(path: Path, variant: str | None, label: str) -> tuple[Path, str, dict]:
    config = _read_config(path) if path.is_dir() else {}
    variant = variant or config.get("taesd_variant")
    if path.is_dir() and not (path / DIFFUSERS_WEIGHTS).is_file():   # our per-part files
        variant = variant or name_hint(label)
        if variant is None:
            present = [v for v in VARIANTS
                       if any(path.glob(f"{v}_*")) or (path / f"{v}.safetensors").is_file()]
            if len(present) != 1:
                raise TaesdError(f"{path} holds weights of {', '.join(present) or 'no variant'}; "
                                 f"pass taesd_variant=")
            variant = present[0]
        return path, get_variant(variant).name, config
    variant = variant or _from_tensors(path, name_hint(label))
    return path, get_variant(variant).name, config


def _hub(repo: str, variant: str | None, subfolder: str | None, revision: str | None):
    from huggingface_hub import hf_hub_download

    def fetch(filename):
        try:
            return Path(hf_hub_download(repo, filename, subfolder=subfolder, revision=revision))
        except Exception:
            return None

    config = fetch(CONFIG_NAME)
    if config is not None and fetch(DIFFUSERS_WEIGHTS) is not None:
        return _local(config.parent, variant, repo)
    name = variant or name_hint(repo)
    if name is None:
        raise TaesdError(f"{repo} is no local path, and no hub repo with {CONFIG_NAME} + {DIFFUSERS_WEIGHTS} "
                         f"could be read; pass taesd_variant= for a repo of per-variant files")
    v = get_variant(name)
    combined = fetch(f"{v.name}.safetensors")
    if combined is not None:
        return _local(combined, v.name, repo)
    parts = [fetch(v.part_file(p)) for p in ("encoder", "decoder")]
    if all(parts):
        return _local(parts[0].parent, v.name, repo)
    raise TaesdError(f"found no {v.name} weights in the hub repo {repo} "
                     f"({CONFIG_NAME} + {DIFFUSERS_WEIGHTS}, "
                     f"{v.name}.safetensors or {v.encoder_file} + {v.decoder_file}); check the name, or that "
                     f"the hub can be reached (HF_HUB_OFFLINE)")


def locate(name_or_path, variant: str | None = None, subfolder: str | None = None,
           revision: str | None = None) -> tuple[Path, str, dict]:
    """(weights path for taesd.load, variant name, the folder's config.json or {})."""
    path = Path(name_or_path)
    if subfolder:
        path = path / subfolder
    if path.exists():
        return _local(path, variant, str(name_or_path))
    text = str(name_or_path)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise TaesdError(f"{name_or_path} does not exist (and is no hub repo id like madebyollin/taef2)")
    return _hub(text, variant, subfolder, revision)
