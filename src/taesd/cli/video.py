"""taesd video: the TAEHV family on video files (encode / decode / roundtrip / info).

    taesd video roundtrip clip.mp4 --variant taew2_1 [--weights taew2_1.pth] [-o out.mp4] [--chunk 8]
    taesd video encode clip.mp4 --variant taew2_1 -o clip.latents.safetensors
    taesd video decode clip.latents.safetensors -o decoded.mp4
    taesd video info [FILE]

Weights: --weights FILE, else ``<variant>.pth`` / ``<variant>.safetensors`` in $TAESD_WEIGHTS.
Latent files are safetensors holding ``latents`` (1 x T x C x h x w) with the variant, fps, frame
count and frame size as metadata. ``--chunk`` frames per step bound the working memory; ``--tile-size``
cuts each step into spatial tiles (seam-exact).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from taesd import settings
from taesd.errors import TaesdError
from taesd.evaluation.video import pad_frames, roundtrip_video
from taesd.io.video import VideoWriter, read_video
from taesd.registry import VIDEO_VARIANTS, get_video_variant
from taesd.runtime.dtypes import DTYPE_CHOICES
from taesd.video import identify_video, load, read_state_dict


def add_parser(sub) -> None:
    p = sub.add_parser("video", help="TAEHV: encode, decode and round-trip videos",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  taesd video roundtrip clip.mp4 --variant taew2_1 -o rt.mp4")
    p.add_argument("action", choices=["encode", "decode", "roundtrip", "info"])
    p.add_argument("input", nargs="?", help="video (mp4/webm/mkv/mov/gif/frame folder) or latent file")
    p.add_argument("--variant", choices=list(VIDEO_VARIANTS), help="the TAEHV weights' variant")
    p.add_argument("--weights", help="a taehv .pth or .safetensors file")
    p.add_argument("-o", "--output", help="output file (video, frame folder or .safetensors latents)")
    p.add_argument("--chunk", type=int, default=None, help="frames per step (bounded memory)")
    p.add_argument("--tile-size", type=int, default=None, metavar="N",
                   help="spatial tiles of N latent pixels (seam-exact: same result, less memory per step)")
    p.add_argument("--max-frames", type=int, default=None, help="read at most this many frames")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help="precision of the computation (default: fp32, in bf16 on AMX and AVX-512-BF16 "
                        "CPUs; files keep fp32)")
    p.set_defaults(run=run)


def _weights(args) -> Path:
    if args.weights:
        return Path(args.weights)
    folder = settings.weights_path()
    if args.variant and folder:
        for name in (f"{args.variant}.safetensors", f"{args.variant}.pth",
                     f"safetensors/{args.variant}.safetensors"):
            if (folder / name).is_file():
                return folder / name
    raise TaesdError("no TAEHV weights: pass --weights FILE (and --variant), or put <variant>.pth in "
                     "$TAESD_WEIGHTS")


def _info(args) -> int:
    if args.input:
        names = identify_video(read_state_dict(args.input))
        print(f"{args.input}: {'/'.join(names) if names else 'no TAEHV layout'}")
        return 0
    print("| variant | serves | latent channels | patch | space / time factor | decoder |")
    for v in VIDEO_VARIANTS.values():
        print(f"| {v.name} | {', '.join(v.serves)} | {v.latent_channels} | {v.patch_size} | "
              f"{v.downscale}x / {v.time_downscale}x | {v.decoder_block} |")
    return 0


def _tile(args) -> int | None:
    tile = getattr(args, "tile_size", None)
    if tile is not None and tile < 1:
        raise TaesdError(f"--tile-size must be a positive number of latent pixels (e.g. 16), not {tile}")
    return tile


def _progress(done: int, what: str) -> None:
    print(f"\r{done} {what}", end="", file=sys.stderr, flush=True)


def run(args) -> int:
    if args.action == "info":
        return _info(args)
    if not args.input:
        raise TaesdError(f"taesd video {args.action} needs an input file")
    if args.action == "decode" and args.variant is None:
        args.variant = _latent_meta(args.input)[0].get("variant")
    model = load(_weights(args), variant=args.variant, dtype=getattr(args, "dtype", None)).eval()
    with torch.no_grad():
        if args.action == "roundtrip":
            clip = read_video(args.input, args.max_frames)
            metrics, _ = roundtrip_video(model, clip, args.output, args.chunk, _tile(args))
            for k, (p, s) in enumerate(zip(metrics.psnr, metrics.ssim or [float("nan")] * len(metrics.psnr))):
                print(f"frame {k:4d}  PSNR {p:6.2f} dB  SSIM {s:.4f}")
            print(metrics.summary())
        elif args.action == "encode":
            _encode(model, args)
        else:
            _decode(model, args)
    return 0


def _encode(model, args) -> None:
    from safetensors.torch import save_file
    clip = read_video(args.input, args.max_frames)
    h, w = clip.size
    pieces, frames_done = [], 0
    for piece in model.encode_chunks(pad_frames(clip.frames, model.variant.downscale), args.chunk,
                                     _tile(args)):
        pieces.append(piece)
        frames_done += piece.shape[1] * model.time_downscale
        _progress(min(frames_done, clip.frames.shape[1]), "frames encoded")
    out = Path(args.output or Path(args.input).with_suffix(f".{model.variant.name}.safetensors"))
    meta = {"variant": model.variant.name, "fps": str(clip.fps), "frames": str(clip.frames.shape[1]),
            "height": str(h), "width": str(w)}
    save_file({"latents": torch.cat(pieces, 1).contiguous()}, str(out), metadata=meta)
    print(f"\nwrote {out}")


def _latent_meta(path: str, tensor: bool = False) -> tuple[dict, torch.Tensor | None]:
    """(metadata, latents if ``tensor``) of a latent file that ``encode`` wrote."""
    from safetensors import safe_open
    if not Path(path).is_file():
        raise TaesdError(f"no latent file at {path}; pass a .safetensors file from taesd video encode")
    with safe_open(path, "pt") as f:
        if "latents" not in f.keys():
            raise TaesdError(f"{path} holds no 'latents' tensor; pass a file from taesd video encode")
        return f.metadata() or {}, f.get_tensor("latents") if tensor else None


def _decode(model, args) -> None:
    meta, latents = _latent_meta(args.input, tensor=True)
    if meta.get("variant") and meta["variant"] != model.variant.name:
        get_video_variant(meta["variant"])
        raise TaesdError(f"{args.input} holds {meta['variant']} latents; pass --variant {meta['variant']}")
    h, w = int(meta.get("height", 0)) or None, int(meta.get("width", 0)) or None
    n = int(meta.get("frames", 0)) or None
    out = Path(args.output or Path(args.input).with_suffix(".mp4"))
    with VideoWriter(out, float(meta.get("fps", 16))) as writer:
        chunk = args.chunk // model.time_downscale or 1 if args.chunk else None
        for piece in model.decode_chunks(latents.float(), chunk, _tile(args)):
            piece = piece[..., :h, :w]
            if n is not None:
                piece = piece[:, :max(0, n - writer.count)]
            writer.write(piece)
            _progress(writer.count, "frames decoded")
    print(f"\nwrote {out}")
