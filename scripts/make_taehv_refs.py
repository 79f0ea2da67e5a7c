#!/usr/bin/env python3
"""Make tests/data/taehv/refs.safetensors: what the published taehv.py computes, on seeded weights.

The oracle is madebyollin/taehv's own ``taehv.py`` (main at 1f14a56; taeltx2_3_wide from the
2026_03_11_taeltx23_wide branch at 32ac014). Its code stays out of this repository: pass the paths
of the two copies, e.g.

    git -C <taehv checkout> show 1f14a56:taehv.py > /tmp/taehv_ref/taehv.py
    git -C <taehv checkout> show 32ac014:taehv.py > /tmp/taehv_ref/taehv_wide.py
    python scripts/make_taehv_refs.py /tmp/taehv_ref/taehv.py /tmp/taehv_ref/taehv_wide.py

For every published file name it writes seeded fresh weights (``fresh_state_dict``, fp16 as published)
as ``<name>.pth`` into a scratch folder, lets the published class load them by that name (the name
picks its settings there), and records its outputs on seeded clips (``clip``): the whole-clip encode and
decode, upstream's sequential decode, and a few framings that trim. tests/test_taehv.py rebuilds the same
weights from the same function, saves them in both published layouts and compares.
Stored decoded frames keep every 3rd pixel per axis (plus each frame's full mean) to stay small.
"""
from __future__ import annotations

import importlib.util
import sys
import tempfile
import zlib
from pathlib import Path
from unittest import mock

import torch

SEED = 20
SIZE = 32            # frames are SIZE x SIZE px: 1-4 latent px per side across the patch sizes
SUBSAMPLE = 3        # decoded frames are stored as frames[..., ::3, ::3]
NAMES = ["taehv", "taew2_1", "taew2_2", "taew2_2_super", "taehv1_5", "taehv1_5_super", "taeh3", "taecvx",
         "taeos1_3", "taeltx_2", "taeltx2_3", "taeltx2_3_wide"]
# (case, frames to encode, latents to decode, taehv.py keyword arguments)
CASES = {"taeh3": [("", 20, 7, {})],
         "taecvx": [("", 9, 3, {}), ("even", 8, 4, {})],
         "taew2_1": [("", 9, 3, {}), ("preview", 9, 3, {"decoder_time_upscale": (False, False)})]}
DEFAULT_CASES = [("", 9, 3, {})]


def fresh_state_dict(name: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Seeded weights for these keys, independent of module order: He-scaled normal weights, small
    biases, the decoder's last bias +0.5 so decoded pixels sit inside (0, 1). Rounded to fp16."""
    last_bias = max((k for k in shapes if k.startswith("decoder.") and k.endswith(".bias")),
                    key=lambda k: int(k.split(".")[1]), default=None)
    out = {}
    for key in sorted(shapes):
        g = torch.Generator().manual_seed(SEED * 1_000_003 + zlib.crc32(f"{name}/{key}".encode()))
        shape = tuple(shapes[key])
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if len(shape) == 4:
            t *= (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5 * 0.8
        else:
            t *= 0.05
        if key == last_bias:
            t += 0.5
        out[key] = t.to(torch.float16)
    return out


def clip(kind: str, n: int, t: int, c: int, size: int) -> torch.Tensor:
    """A seeded clip, N x T x C x H x W: frames in [0, 1] or latents ~ N(0, 1)."""
    g = torch.Generator().manual_seed(SEED + 7 * t + c + size)
    if kind == "frames":
        return torch.rand(n, t, c, size, size, generator=g)
    return torch.randn(n, t, c, size, size, generator=g)


def _import(path: str, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shapes(ref, name: str) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes the published class builds for ``name`` (its settings come from the name)."""
    with mock.patch.object(ref.torch, "load", lambda *a, **k: {}), \
         mock.patch.object(ref.TAEHV, "patch_tgrow_layers", lambda self, sd: sd), \
         mock.patch.object(ref.TAEHV, "load_state_dict", lambda self, sd, *a, **k: None):
        model = ref.TAEHV(checkpoint_path=f"{name}.pth")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _small(frames: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"pixels": frames[..., ::SUBSAMPLE, ::SUBSAMPLE].contiguous(),
            "means": frames.double().mean(dim=(2, 3, 4))}


@torch.no_grad()
def references(ref, name: str, folder: Path) -> dict[str, torch.Tensor]:
    path = folder / f"{name}.pth"
    torch.save(fresh_state_dict(name, _shapes(ref, name)), path)
    out = {}
    for case, n_frames, n_latents, kwargs in CASES.get(name, DEFAULT_CASES):
        model = ref.TAEHV(checkpoint_path=str(path), **kwargs).float().eval()
        prefix = f"{name}/{case}" if case else name
        channels = model.latent_channels
        latent_size = SIZE // (8 * model.patch_size)
        frames = clip("frames", 1, n_frames, 3, SIZE)
        latents = clip("latents", 1, n_latents, channels, latent_size)
        out[f"{prefix}/encode"] = model.encode_video(frames, parallel=True, show_progress_bar=False)
        whole = model.decode_video(latents, parallel=True, show_progress_bar=False)
        seq = model.decode_video(latents, parallel=False, show_progress_bar=False)
        # fp32 sums in another order: on an AVX2 Zen 3 these differ by more than 1e-5 (test_taehv TOL)
        assert whole.shape == seq.shape and (whole - seq).abs().max() < 3e-5, name
        for k, v in _small(whole).items():
            out[f"{prefix}/decode/{k}"] = v
        if name == "taecvx":   # upstream's streaming wrapper keeps every frame of CogVideoX (no trim)
            stream = ref.StreamingTAEHV(model)
            frames_out = [f for f in [stream.decode(latents)] if f is not None] + stream.flush_decoder()
            for k, v in _small(torch.cat(frames_out, 1)).items():
                out[f"{prefix}/stream_decode/{k}"] = v
        print(f"{prefix:22s} encode {tuple(out[f'{prefix}/encode'].shape)}  decode {tuple(whole.shape)}")
    return out


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit(__doc__)
    torch.manual_seed(SEED)
    main_ref, wide_ref = _import(argv[0], "taehv_main_ref"), _import(argv[1], "taehv_wide_ref")
    out_path = Path(__file__).resolve().parents[1] / "tests" / "data" / "taehv" / "refs.safetensors"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in NAMES:
            tensors.update(references(wide_ref if name.endswith("_wide") else main_ref, name, Path(tmp)))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_path),
              metadata={"oracle": "madebyollin/taehv taehv.py @ 1f14a56 (wide: 32ac014)", "seed": str(SEED)})
    print(f"wrote {out_path} ({out_path.stat().st_size} bytes, {len(tensors)} tensors)")


if __name__ == "__main__":
    main(sys.argv[1:])
