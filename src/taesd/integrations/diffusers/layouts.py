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
from taesd.io.weights.identify import identify_variant
from taesd.io.weights.read import DIFFUSERS_WEIGHTS
from taesd.io.weights.resolve import resolve
from taesd.io.weights.source import read_source
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
    return identify_variant(read_source(path).parts, [hint] if hint else [], flag="taesd_variant='{}'")


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


def _published(repo: str, variant: str | None, subfolder: str | None) -> str | None:
    """The variant whose published hub repo ``repo`` is (madebyollin/taef2), or None."""
    if subfolder:
        return None
    names = [v.name for v in VARIANTS.values() if any(s.host == "hub" and s.repo == repo for s in v.sources)]
    if variant is not None:
        return get_variant(variant).name if get_variant(variant).name in names else None
    return names[0] if len(names) == 1 else None


def _hub(repo: str, variant: str | None, subfolder: str | None, revision: str | None):
    published = _published(repo, variant, subfolder)
    if published is not None:   # a registry source: the one resolver (cache, verified download)
        sources = resolve(published, None, None, revision, "hub")
        paths = {p: src.path for p, src in sources.items()}
        folder = next(iter(paths.values()))
        config = _read_config(folder) if folder.is_dir() else {}
        return (folder if len(set(paths.values())) == 1 else paths), published, config
    return _other_repo(repo, variant, subfolder, revision)


def _other_repo(repo: str, variant: str | None, subfolder: str | None, revision: str | None):
    """A hub repo outside the registry: the first layout whose files it has. A file the repo lacks
    is the next layout; any other hub error (network, offline, no such repo) is reported in one line."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from taesd.io.weights import download

    def fetch(filename):
        try:
            if not download.offline():
                download.probe(f"{download.hub_endpoint()}/{repo}")   # fail fast, no retry storm
            return Path(hf_hub_download(repo, filename, subfolder=subfolder, revision=revision))
        except LocalEntryNotFoundError as e:    # offline, or the hub cannot be reached
            raise _hub_error(repo, filename, e) from e
        except EntryNotFoundError:             # the repo lacks this file: try the next layout
            return None
        except Exception as e:
            raise _hub_error(repo, filename, e) from e

    config = fetch(CONFIG_NAME)
    if config is not None and fetch(DIFFUSERS_WEIGHTS) is not None:
        return _local(config.parent, variant, repo)
    name = variant or name_hint(repo)
    if name is None:
        raise TaesdError(f"{repo} has no {CONFIG_NAME} + {DIFFUSERS_WEIGHTS}; pass taesd_variant= for a "
                         f"repo of per-variant files")
    v = get_variant(name)
    combined = fetch(f"{v.name}.safetensors")
    if combined is not None:
        return _local(combined, v.name, repo)
    parts = [fetch(v.part_file(p)) for p in ("encoder", "decoder")]
    if all(parts):
        return _local(parts[0].parent, v.name, repo)
    raise TaesdError(f"found no {v.name} weights in the hub repo {repo} ({CONFIG_NAME} + "
                     f"{DIFFUSERS_WEIGHTS}, {v.name}.safetensors or {v.encoder_file} + {v.decoder_file})")


def _hub_error(repo: str, filename: str, e: Exception) -> TaesdError:
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return TaesdError(f"cannot read {filename} from the hub repo {repo}: {type(e).__name__}"
                      f"{': ' + text if text else ''}; check the name and the network (HF_HUB_OFFLINE, "
                      f"HF_ENDPOINT), or pass a local path")


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
