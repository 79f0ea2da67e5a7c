"""taesd info: the variants table, or what a weight file holds."""
from __future__ import annotations

from pathlib import Path

from taesd.cli.common import command_parser
from taesd.io.inputs import IMAGE_SUFFIXES
from taesd.registry import list_variants


def add_parser(sub):
    p = command_parser(sub, "info", "list the variants, or show what a weight file holds",
                       "taesd info ../shared/weights/taef2_decoder.pth",
                       "Without arguments: the table of TAESD variants and of the TAEHV (video) variants "
                       "with the models each serves. With files: the format, parts, matching variants, "
                       "dtype, parameter count and sha256 of each; for .onnx exports: inputs, outputs, "
                       "metadata and the operator set with counts; for TAEHV weights, videos and video "
                       "latents: what they hold.")
    p.add_argument("files", nargs="*", help="weight files, diffusers folders, exported .onnx files, videos")
    p.add_argument("--variant", "-v", metavar="NAME",
                   help="list this variant's published sources (what is cached, sha256) and the files it "
                        "resolves to ($TAESD_WEIGHTS, then the cache; nothing is downloaded)")
    p.add_argument("--source", choices=["hub", "github"], help="with --variant: only that host's files")
    p.add_argument("--revision", help="with --variant: the revision to resolve (pins the first source)")
    p.set_defaults(run=run)


def variants_table() -> str:
    rows = [("name", "family", "latent ch", "image ch", "downscale", "arch", "hub")]
    for v in list_variants():
        rows.append((v.name, v.family, str(v.latent_channels), str(v.image_channels), f"{v.downscale}x",
                     v.arch, next((s.repo for s in v.sources if s.host == "hub"), "-")))
    return aligned(rows) + "\n\n" + video_variants_table()


def aligned(rows: list[tuple[str, ...]]) -> str:
    """Rows as left-aligned columns, a rule under the first (the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def video_variants_table() -> str:
    """The TAEHV family (``taesd video``): which video VAE each speaks and the models it serves."""
    from taesd.registry import VIDEO_VARIANTS
    rows = [("video", "vae", "latent ch", "downscale", "time", "serves")]
    for v in VIDEO_VARIANTS.values():
        rows.append((v.name, v.family, str(v.latent_channels), f"{v.downscale}x", f"{v.time_downscale}x",
                     ", ".join(v.serves)))
    return aligned(rows)


def describe_file(path: Path) -> str:
    from taesd.io.weights.identify import describe
    from taesd.io.weights.source import read_source
    src = read_source(path)
    lines = [f"{path}", f"  format: {src.format}", f"  sha256: {src.sha256}"]
    for part, sd in src.parts.items():
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in sd.values()})
        n = sum(t.numel() for t in sd.values())
        lines.append(f"  {part}: {describe(sd, part)}, {n:,} parameters, {'/'.join(dtypes)}")
    for k, val in src.extras.items():
        lines.append(f"  {k}: {_values(val)}")
    return "\n".join(lines)


def describe_image(path: Path) -> str:
    """A latent PNG (its variant, latent shape, image size) or a picture (size, mode, what to do)."""
    from PIL import Image

    from taesd.errors import TaesdError
    from taesd.io.latents import load_latents
    with Image.open(path) as im:
        marked = "taesd_variant" in getattr(im, "text", {})
        size, mode = im.size, im.mode
    if marked:
        latents, v, orig = load_latents(path)
        shown = f"{orig[1]}x{orig[0]}" if orig else "not recorded"
        return (f"{path}\n  latents: {v.name} ({v.family}), {'x'.join(map(str, latents.shape))}, 8-bit PNG\n"
                f"  image size: {shown}\n  decode: taesd decode {path}")
    if not path.is_file():
        raise TaesdError(f"{path} does not exist")
    return (f"{path}\n  an image, not weights: {size[0]}x{size[1]} {mode}\n"
            f"  encode it: taesd encode {path} --variant NAME, or round-trip: taesd roundtrip {path} -v NAME")


def _values(val) -> str:
    """A scalar, or per-channel values summarised (64 numbers do not fit a line)."""
    if not isinstance(val, list):
        return f"{val:g}"
    return f"{len(val)} per-channel values, {min(val):g} .. {max(val):g}"


def sources_table(variant: str, revision: str | None = None, source: str | None = None) -> str:
    """Every published file of ``variant``: where, layout, parts, the sha256 known, what is cached."""
    from taesd.errors import TaesdError
    from taesd.io.weights import download
    from taesd.io.weights.download import sources_for
    lines = [f"{variant} sources, preferred first:"]
    pinned = sources_for(variant, None, source, revision)
    for src in (pinned if revision else sources_for(variant, None, source)):
        try:
            path = download.cached(src)
            state = f"cached {download.location(src, path)}" if path else "not cached"
        except TaesdError as e:
            state = f"cache damaged: {e}"
        digest = src.sha256 or (download.recorded_sha256(path) if path else None)
        known = "registry" if src.sha256 else "recorded at download" if digest else \
            "checked against the hub's ETag" if src.host == "hub" else "recorded at the first download"
        size = f", {src.size:,} bytes" if src.size else ""
        what = f"{src.layout}: {'+'.join(src.parts)}"
        lines += [f"  {src.host:6} {src.repo}@{src.revision} {src.filename} ({what})",
                  f"         {download.url_of(src)}",
                  f"         sha256 {digest or '-'} ({known}{size})", f"         {state}"]
    return "\n".join(lines)


def resolved(variant: str, revision: str | None, source: str | None = None) -> str:
    """Which file each part of ``variant`` resolves to, with its sha256 (no download)."""
    from taesd.errors import TaesdError
    from taesd.io.weights.resolve import resolve
    from taesd.registry import PARTS
    lines = [f"{variant} resolves to:"]
    for part in PARTS:
        try:
            path = resolve(variant, None, part, revision, source, fetch=False)[part].path
        except TaesdError as e:
            lines.append(f"  {part}: not found ({e})")
            continue
        lines.append(f"  {part} <- " + describe_file(path).replace("\n", "\n  "))
    return "\n".join(lines)


def run(args) -> int:
    from taesd.cli.dispatch import describe_video_file, video_sources
    from taesd.registry import VIDEO_VARIANTS
    if args.variant in VIDEO_VARIANTS:
        print(video_sources(args.variant))
        return 0
    if args.variant:
        print(sources_table(args.variant, args.revision, args.source))
        print(resolved(args.variant, args.revision, args.source))
        return 0
    if not args.files:
        print(variants_table())
        return 0
    for f in map(Path, args.files):
        video = describe_video_file(f)
        if video is not None:
            print(video)
        elif f.suffix == ".onnx":
            from taesd.export.onnx import describe_onnx
            print(describe_onnx(f))
        elif f.suffix.lower() in IMAGE_SUFFIXES:
            print(describe_image(f))
        else:
            print(describe_file(f))
    return 0
