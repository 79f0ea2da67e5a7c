"""Safe reading: weight bytes -> tensors, bounded before anything is allocated, and the one place
files are hashed.

- ``.pth``: a zip of records (torch.save). Its central directory gives every record's stored and
  unpacked size, so a file whose records would unpack beyond ``MAX_UNPACKED_BYTES`` (or a compressed
  record that expands more than ``MAX_RATIO`` times: torch.save never compresses) is refused before
  torch reads a byte of it. Pickles that would run code are refused. Tensors that share storage are
  given storage of their own, so every later step (casting, saving as safetensors) sees plain tensors.
- ``.safetensors``: the header's offsets are checked against the file size by safetensors itself.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from taesd.errors import TaesdError

StateDict = dict[str, torch.Tensor]
PUBLISHED_AT = "https://github.com/madebyollin/taesd"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
# What diffusers' save_pretrained may write: safetensors or pickle (safe_serialization=False), plain
# or as the fp16 variant (variant="fp16"); read in this order.
DIFFUSERS_WEIGHT_NAMES = (DIFFUSERS_WEIGHTS, "diffusion_pytorch_model.fp16.safetensors",
                          "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
# The largest published TAESD file is ~15 MB; 1 GiB of tensors is far beyond any TAESD network.
MAX_UNPACKED_BYTES = 1 << 30
MAX_RATIO = 64


@dataclass
class WeightSource:
    """What one weight file holds, after reading it."""
    path: Path
    format: str                                 # a layouts.Layout value: pth, safetensors, ...
    parts: dict[str, StateDict]                 # part -> state dict in original (pth) keys
    # comfyui vae_scale / vae_shift: a float, or one float per latent channel (Qwen Image 2.1)
    extras: "dict[str, float | list[float]]" = field(default_factory=dict)
    sha256: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- hashing (the only place)

def sha256_of(path: str | os.PathLike) -> str:
    return _digest(hashlib.sha256(), path)


def git_blob_sha1(path: str | os.PathLike) -> str:
    """The git blob id of a file (what the hub's ETag is for files kept outside LFS)."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % Path(path).stat().st_size)
    return _digest(h, path)


def _digest(h, path) -> str:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- reading

def short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:160]


def check_zip_bounds(path: Path, limit: int = MAX_UNPACKED_BYTES) -> None:
    """Refuse a torch zip whose records would unpack beyond ``limit`` bytes, or that holds a record
    compressed more than ``MAX_RATIO`` times: checked from the central directory, before reading."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise TaesdError(f"cannot read {path} as a PyTorch weight file ({short(e)}); "
                         f"the file is damaged or not a .pth state dict, download it again") from e
    total = sum(i.file_size for i in infos)
    if total > limit:
        raise TaesdError(f"refusing {path}: its records unpack to {total:,} bytes, beyond the {limit:,} a "
                         f"TAESD weight file can need (a decompression bomb or another model)")
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED and i.file_size > MAX_RATIO * max(i.compress_size, 1024):
            raise TaesdError(f"refusing {path}: record {i.filename!r} expands {i.compress_size:,} -> "
                             f"{i.file_size:,} bytes (torch.save never compresses; a decompression bomb)")


def _read_torch(path: Path) -> StateDict:
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"
    if is_zip:
        check_zip_bounds(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy-format notices would break the one-line error
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it would call {found.group(1)}" if found else "it needs code to run"
        raise TaesdError(f"refusing to load {path}: unsafe pickle ({what}); TAESD weights are plain "
                         f"state dicts, get the published file from {PUBLISHED_AT}") from e
    except Exception as e:  # truncated zip, not a torch file, ...
        raise TaesdError(f"cannot read {path} as a PyTorch weight file ({short(e)}); "
                         f"the file is damaged or not a .pth state dict, download it again") from e
    # Training checkpoints sometimes wrap the state dict.
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = type(obj).__name__ if not isinstance(obj, dict) else "a dict that is not all tensors"
        raise TaesdError(f"{path} is not a state dict (it holds {what}); pass a TAESD weight file")
    return own_storage(dict(obj))


def own_storage(sd: StateDict) -> StateDict:
    """Each tensor on storage of its own (a copy where it shares one or is a view into a larger one):
    safetensors refuses shared storage, and a view would keep a whole foreign storage alive."""
    seen: set[int] = set()
    out = {}
    for k, t in sd.items():
        ptr = t.untyped_storage().data_ptr()
        whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        out[k] = t if whole and ptr not in seen else t.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
    return out


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:
        raise TaesdError(f"cannot read {path} as safetensors ({short(e)}); "
                         f"the file is damaged or truncated, download or convert it again") from e


def read_file(path: str | os.PathLike) -> StateDict:
    """The raw tensors of a weight file or diffusers folder (keys as stored)."""
    return read_tensors(path)[0]


def read_tensors(path: str | os.PathLike) -> tuple[StateDict, dict[str, str]]:
    """(raw tensors, safetensors metadata or {}) of a weight file or diffusers folder."""
    path = Path(path)
    if not path.exists():
        raise TaesdError(f"weight file {path} does not exist")
    if path.is_dir():
        inner = diffusers_weight_file(path)
        return (_read_torch(inner), {}) if inner.suffix == ".bin" else _read_safetensors(inner)
    if path.stat().st_size == 0:
        raise TaesdError(f"weight file {path} is empty; download it again")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
        return _read_torch(path), {}
    return _read_safetensors(path)


def diffusers_weight_file(folder: Path) -> Path:
    """The weight file of a diffusers folder (any name ``DIFFUSERS_WEIGHT_NAMES`` lists)."""
    for name in DIFFUSERS_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise TaesdError(f"{folder} is a folder without {' or '.join(DIFFUSERS_WEIGHT_NAMES)}; "
                     f"pass a weight file or a diffusers AutoencoderTiny folder")


def check_tensors(path: Path, sd: StateDict) -> None:
    """Weights are floating point and finite: an integer, bool or NaN/Inf tensor is a damaged or
    foreign file, refused in one line naming the tensor."""
    for key, t in sd.items():
        if not t.is_floating_point():
            dtype = str(t.dtype).replace("torch.", "")
            raise TaesdError(f"{path}: tensor {key!r} is {dtype}, not floating point; "
                             f"TAESD weights are fp16/fp32, the file is damaged or of another model")
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n = int((~finite).sum())
            raise TaesdError(f"{path}: tensor {key!r} holds {n} NaN/infinite value{'s' if n > 1 else ''}; "
                             f"the weights are damaged, download or train them again")
