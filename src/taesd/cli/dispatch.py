"""Which path a top-level command takes: videos and TAEHV variants go to ``taesd video``.

``taesd roundtrip clip.mp4 --variant taew2_1`` should just work, so ``encode``, ``decode``,
``roundtrip`` and ``info`` hand a video input (mp4/webm/mkv/mov, a GIF or frame folder with a TAEHV
variant), a TAEHV variant or a TAEHV latent/weight file to the same functions ``taesd video`` runs;
nothing about videos is done twice. Images with a TAESD variant take the image path as before.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from taesd.errors import TaesdError
from taesd.io.video import CONTAINERS, FRAME_SUFFIXES, is_video_path
from taesd.registry import VIDEO_VARIANTS


def add_video_options(p: argparse.ArgumentParser) -> None:
    """What only a video run needs (the rest of the command's options carry over)."""
    g = p.add_argument_group("video (TAEHV variants)")
    g.add_argument("--chunk", type=int, default=None, help="frames per step (bounded memory; default: all)")
    g.add_argument("--max-frames", type=int, default=None, help="read at most this many frames")


def _video_latents(path: Path) -> bool:
    """A safetensors file that ``taesd video encode`` wrote (its metadata names a TAEHV variant)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("variant") in VIDEO_VARIANTS
    except Exception:      # not ours to judge here: the image path reports a damaged file
        return False


def is_video_run(action: str, args) -> bool:
    """Whether ``args`` of a top-level ``action`` ask for the video path."""
    inputs = [Path(p) for p in args.inputs]
    if getattr(args, "variant", None) in VIDEO_VARIANTS:
        return True
    if action == "decode":
        return any(_video_latents(p) for p in inputs)
    containers = [p for p in inputs if p.suffix.lower() in CONTAINERS]
    if containers:
        raise TaesdError(f"{containers[0]} is a video: pass a TAEHV variant, e.g. --variant taew2_1 "
                         f"(taesd info lists them)")
    return False


def _output(action: str, src: Path, variant: str | None, output: str | None) -> Path:
    """Where a video result goes: -o, else beside the input (``taesd video``'s names; the round trip
    named as the image round trip names its output)."""
    if output is not None:
        return Path(output)
    if action == "encode":
        return src.with_suffix(f".{variant}.safetensors")
    if action == "decode":
        return src.with_suffix(".mp4")
    suffix = src.suffix.lower() if src.suffix.lower() in (*CONTAINERS, ".gif") else ".mp4"
    return src.parent / f"{src.stem}.{variant}.roundtrip{suffix}"


def run_video(action: str, args) -> int:
    """Run ``taesd video <action>`` with this command's options."""
    from taesd.cli import video
    if len(args.inputs) != 1:
        raise TaesdError(f"taesd {action} takes one video at a time; got {len(args.inputs)} inputs")
    if getattr(args, "device", None) not in (None, "cpu") or getattr(args, "executor", None):
        raise TaesdError("TAEHV variants run on the CPU with their own executor; drop --device/--executor")
    if getattr(args, "max_memory", None):
        raise TaesdError("--max-memory is for images; bound a video's memory with --chunk (and --tile-size)")
    weights = args.weights or []
    if len(weights) > 1:
        raise TaesdError("a TAEHV file holds both parts: pass --weights once")
    src = Path(args.inputs[0])
    if args.variant is not None and args.variant not in VIDEO_VARIANTS:
        raise TaesdError(f"{src} holds TAEHV latents, not {args.variant}'s; drop --variant (the file names "
                         f"its own)")
    if action in ("roundtrip", "encode") and not is_video_path(src) and src.suffix.lower() != ".gif":
        raise TaesdError(f"{src} is not a video (mp4/webm/mkv/mov/gif or a frame folder); "
                         f"TAEHV variants take videos")
    out = _output(action, src, args.variant, args.output)
    if out.exists() and not getattr(args, "overwrite", False):
        raise TaesdError(f"{out} exists; pass --overwrite to replace it or -o another path")
    ns = argparse.Namespace(action=action, input=str(src), variant=args.variant,
                            weights=weights[0] if weights else None, output=str(out),
                            chunk=getattr(args, "chunk", None), max_frames=getattr(args, "max_frames", None),
                            tile_size=getattr(args, "tile_size", None), dtype=getattr(args, "dtype", None))
    return video.run(ns)


def describe_video_file(path: Path) -> str | None:
    """``taesd info`` of a TAEHV weight file, a TAEHV latent file or a video; None for anything else."""
    gif = path.suffix.lower() == ".gif"
    frames = path.is_dir() and any(p.suffix.lower() in FRAME_SUFFIXES for p in path.iterdir())
    if (gif and _animated(path)) or frames or (path.suffix.lower() in CONTAINERS and path.is_file()):
        from taesd.io.video import read_video
        clip = read_video(path)
        h, w = clip.size
        return (f"{path}\n  a video: {clip.frames.shape[1]} frames of {w}x{h} at {clip.fps:g} fps\n"
                f"  round-trip it: taesd roundtrip {path} --variant taew2_1 (or another TAEHV variant)")
    if _video_latents(path):
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta, shape = f.metadata() or {}, tuple(f.get_slice("latents").get_shape())
        return (f"{path}\n  latents: {meta['variant']} (TAEHV), {'x'.join(map(str, shape))}, "
                f"{meta.get('frames', '?')} frames of {meta.get('width', '?')}x{meta.get('height', '?')} "
                f"at {meta.get('fps', '?')} fps\n  decode: taesd decode {path}")
    if path.suffix in (".pth", ".safetensors") and path.is_file():
        from taesd.video import identify_video, read_state_dict
        try:
            names = identify_video(read_state_dict(path))
        except (TaesdError, RuntimeError, ValueError):   # not a TAEHV file: the image path says what it is
            return None
        if names:
            v = VIDEO_VARIANTS[names[0]]
            return (f"{path}\n  TAEHV weights (encoder + decoder): {'/'.join(names)}\n"
                    f"  {v.latent_channels} latent channels, {v.downscale}x space, {v.time_downscale}x time; "
                    f"serves {'; '.join(', '.join(VIDEO_VARIANTS[n].serves) for n in names)}")
    return None


def _animated(path: Path) -> bool:
    from PIL import Image
    with Image.open(path) as im:
        return getattr(im, "n_frames", 1) > 1


def video_sources(name: str) -> str:
    """``taesd info --variant`` for a TAEHV variant: its pinned published files."""
    v = VIDEO_VARIANTS[name]
    lines = [f"{name} (TAEHV; {v.family} latents; serves {', '.join(v.serves)}) sources:"]
    for s in v.sources:
        lines.append(f"  {s.host:6} {s.repo}@{s.revision} {s.filename} (encoder+decoder)")
    lines.append("  sha256: recorded on the first download; run it with taesd video ... --weights FILE")
    return "\n".join(lines)
