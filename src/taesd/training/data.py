"""Training images: a folder of pictures as an endless, resumable stream of random crops.

Every random choice is a pure function of (seed, sample number): which image (a fresh shuffle
each epoch), where to crop, whether and how to colour-augment. So sample ``n`` is the same no
matter how many processes, workers or restarts produced it, and resuming at step ``s`` only needs
the sample number ``s * global_batch``.

Corrupt or unreadable files never stop a run: the sample moves on to the next image of the same
shuffle and the bad file's path is reported (``Crop.skipped``) so the trainer can count it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from taesd import settings
from taesd.errors import TaesdError
from taesd.io.files import atomic_path
from taesd.io.images import load_image, pad_to_multiple
from taesd.io.inputs import IMAGE_SUFFIXES, expand_inputs


def sample_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator seeded from the run's seed and integer keys (epoch, sample number, ...)."""
    h = seed & 0xFFFFFFFF
    for k in keys:  # a small integer hash; enough to decorrelate neighbouring keys
        h = (h * 6364136223846793005 + (k & 0xFFFFFFFFFFFF) + 1442695040888963407) % (1 << 63)
    return torch.Generator().manual_seed(h)


def random_colour_matrix(g: torch.Generator, strength: float = 0.5) -> torch.Tensor:
    """A random 3x3 colour matrix blended into the identity (the published augmentation)."""
    m = torch.rand(3, 3, generator=g)
    m = m / m.sum(1, keepdim=True)  # rows sum to 1: keeps brightness roughly
    return (1 - strength) * torch.eye(3) + strength * m


@dataclass
class Crop:
    image: torch.Tensor                       # 3 x size x size in [0, 1]
    skipped: list[str] = field(default_factory=list)
    latent: torch.Tensor | None = None        # the teacher's latents of this crop (cached runs)
    decoded: torch.Tensor | None = None       # the teacher's decode of this crop (cached runs)


class ImageCrops(torch.utils.data.Dataset):
    """Sample ``n`` -> a random ``crop`` x ``crop`` patch of one image of the folder.

    Images smaller than the crop are upscaled (bilinear) until they fit. ``colour_aug`` is the
    fraction of samples that get a random colour matrix.

    With ``cache`` (index -> {"image", "latent", optional "decoded"}, see ``build_latent_cache``) the
    teacher's outputs come from the cache: crops are aligned to the latent grid, and there is no
    flip or colour augmentation (the cached targets would no longer match).
    """

    def __init__(self, paths, crop: int, seed: int = 0, colour_aug: float = 0.0, multiple: int = 8,
                 cache: dict | None = None):
        self.files = expand_inputs(paths if isinstance(paths, (list, tuple)) else [paths], IMAGE_SUFFIXES)
        if crop % multiple:
            raise TaesdError(f"crop size {crop} is not a multiple of {multiple}; "
                             f"pick e.g. {crop - crop % multiple or multiple}")
        self.crop, self.seed, self.colour_aug, self.multiple = crop, seed, colour_aug, multiple
        self.latent_cache = cache
        self.cache: dict[int, torch.Tensor] = {}   # small folders stay decoded in memory
        self.cache_limit = settings.image_cache()

    def __len__(self) -> int:  # the stream is endless; this is one epoch
        return len(self.files)

    def order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.files), generator=sample_generator(self.seed, 1, epoch))

    def _open(self, i: int) -> torch.Tensor:
        if self.latent_cache is not None:
            if i not in self.latent_cache:
                raise TaesdError(f"{self.files[i]} is not in the latent cache (unreadable)")
            return self.latent_cache[i]["image"]
        if i not in self.cache:
            img = load_image(self.files[i], 3)
            if len(self.cache) < self.cache_limit:
                self.cache[i] = img
            return img
        return self.cache[i]

    def __getitem__(self, n: int) -> Crop:
        epoch, pos = divmod(int(n), len(self.files))
        order = self.order(epoch)
        skipped = []
        for k in range(len(self.files)):
            path_index = int(order[(pos + k) % len(self.files)])
            try:
                img = self._open(path_index)
                break
            except TaesdError:
                skipped.append(str(self.files[path_index]))
        else:
            raise TaesdError("no image in the training folder could be read")
        g = sample_generator(self.seed, 2, int(n))
        if self.latent_cache is not None:
            return self.aligned_crop(self.latent_cache[path_index], g, skipped)
        return Crop(self.augment(img, g), skipped)

    def aligned_crop(self, entry: dict, g: torch.Generator, skipped: list[str]) -> Crop:
        c, d = self.crop, self.multiple
        h, w = entry["image"].shape[-2:]
        top = int(torch.randint(0, (h - c) // d + 1, (1,), generator=g)) * d
        left = int(torch.randint(0, (w - c) // d + 1, (1,), generator=g)) * d

        def cut(x, f):
            return x[:, top // f:(top + c) // f, left // f:(left + c) // f].float().contiguous()
        return Crop(cut(entry["image"], 1), skipped, cut(entry["latent"], d),
                    cut(entry["decoded"], 1) if "decoded" in entry else None)

    def augment(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        c = self.crop
        img = fit_to(img, c)
        h, w = img.shape[-2:]
        top = int(torch.randint(0, h - c + 1, (1,), generator=g))
        left = int(torch.randint(0, w - c + 1, (1,), generator=g))
        out = img[:, top:top + c, left:left + c]
        if torch.rand((), generator=g) < 0.5:  # horizontal flip
            out = out.flip(-1)
        if torch.rand((), generator=g) < self.colour_aug:
            out = torch.einsum("ij,jhw->ihw", random_colour_matrix(g), out).clamp(0, 1)
        return out.contiguous()


def fit_to(img: torch.Tensor, size: int) -> torch.Tensor:
    """Upscale (bilinear) an image whose shorter side is below ``size`` until it fits."""
    h, w = img.shape[-2:]
    if min(h, w) >= size:
        return img
    scale = size / min(h, w)
    return F.interpolate(img[None], size=(max(size, round(h * scale)), max(size, round(w * scale))),
                         mode="bilinear", align_corners=False)[0]


class ShardSampler(torch.utils.data.Sampler):
    """Sample numbers ``start, start+1, ...`` of one process: ``rank`` takes every ``world``-th."""

    def __init__(self, start: int, rank: int = 0, world: int = 1):
        self.start, self.rank, self.world = start, rank, world

    def __iter__(self):
        n = self.start + self.rank
        while True:
            yield n
            n += self.world


def collate(crops: list[Crop]) -> dict:
    def stack(name):
        items = [getattr(c, name) for c in crops]
        return None if items[0] is None else torch.stack(items)
    return {"images": stack("image"), "latents": stack("latent"), "decoded": stack("decoded"),
            "skipped": [s for c in crops for s in c.skipped]}


def crop_loader(dataset: ImageCrops, batch: int, start_sample: int, rank: int = 0, world: int = 1,
                workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches of this process's share of the stream, beginning at global sample ``start_sample``.

    Global batch ``b * world`` of step ``s`` is samples ``[s*b*world, (s+1)*b*world)``; process
    ``rank`` gets those with number = rank (mod world).
    """
    return torch.utils.data.DataLoader(dataset, batch_size=batch,
                                       sampler=ShardSampler(start_sample, rank, world), num_workers=workers,
                                       collate_fn=collate,
                                       persistent_workers=workers > 0)


def build_latent_cache(files: list, teacher, folder: "str | os.PathLike", min_size: int, with_decoded: bool,
                       rank: int = 0, world: int = 1, shard_size: int = 64) -> list:
    """Run the teacher once over every image and keep the results in safetensors shards.

    Each image (upscaled to at least ``min_size``, padded to the latent grid) is stored with its
    latents (float32) and, if asked, the teacher's decode. A shard already written for the same
    files is reused, so a resumed run does not re-encode. Process ``rank`` writes shards rank,
    rank + world, ...; call ``load_latent_cache`` after all processes are done. Returns the
    unreadable files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    skipped = []
    shards = [files[i:i + shard_size] for i in range(0, len(files), shard_size)]
    for s in range(rank, len(shards), world):
        path = folder / f"shard_{s:05d}.safetensors"
        names = [str(f) for f in shards[s]]
        meta = {"files": json.dumps(names), "teacher": str(teacher.name), "min_size": str(min_size),
                "decoded": str(with_decoded)}
        if path.is_file() and _shard_meta(path) == meta:
            continue
        tensors = {}
        for k, f in enumerate(shards[s]):
            i = s * shard_size + k
            try:
                img = load_image(f, 3)
            except TaesdError:
                skipped.append(str(f))
                continue
            img, _ = pad_to_multiple(fit_to(img, min_size), teacher.downscale)
            img = img.half().float()  # stored as float16: encode exactly what the crops will see
            latent = teacher.encode(img[None])
            tensors[f"{i}.image"] = img.half()
            tensors[f"{i}.latent"] = latent[0].float().cpu()
            if with_decoded:
                tensors[f"{i}.decoded"] = teacher.decode(latent)[0].half().cpu()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    return skipped


def _shard_meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def load_latent_cache(folder: "str | os.PathLike") -> dict:
    """index -> {"image", "latent", "decoded"?} from every shard in ``folder``."""
    cache: dict[int, dict] = {}
    for path in sorted(Path(folder).glob("shard_*.safetensors")):
        for key, t in load_file(str(path)).items():
            i, name = key.split(".", 1)
            cache.setdefault(int(i), {})[name] = t
    return cache
