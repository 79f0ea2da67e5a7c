"""taesd download: fetch a variant's published weights into the cache, verified, and say where."""
from __future__ import annotations

import os

from taesd.cli.common import command_parser
from taesd.errors import TaesdError
from taesd.io.weights import download
from taesd.io.weights.formats import WEIGHTS_ENV
from taesd.io.weights.resolve import SOURCES, not_found, sources_for
from taesd.registry import PARTS, VARIANTS, get_variant, normalize_parts


def add_parser(sub):
    p = command_parser(sub, "download", "download a variant's published weights into the cache (verified)",
                       "taesd download taef2 --source github --parts decoder",
                       "Fetch the published weight files of VARIANT from the Hugging Face hub ($HF_ENDPOINT, "
                       "into the Hugging Face cache) or GitHub ($TAESD_GITHUB_URL, into $TAESD_CACHE_DIR/"
                       "weights), show progress, check each file's sha256 (against the registry, the hub's "
                       "ETag, or the hash recorded at an earlier download) and print it with the cached "
                       "path. "
                       "Later loads use the cache without asking the network. A failed or unverified "
                       "download leaves nothing behind.")
    p.add_argument("variant", choices=list(VARIANTS), metavar="VARIANT",
                   help=f"one of: {', '.join(VARIANTS)}")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="default: both")
    p.add_argument("--source", choices=SOURCES,
                   help="download only from there (default: the first that works)")
    p.add_argument("--revision", help="pin the source's revision (a hub commit, or a GitHub commit with "
                   "--source github); default: the registry's pin")
    p.set_defaults(run=run)


def fetch_parts(variant: str, parts, source: str | None, revision: str | None) -> list[tuple]:
    """[(WeightFile, path, sha256)] of the files that hold ``parts``, downloading what is missing:
    per part the first source that works, each file once."""
    v = get_variant(variant)
    done: list[tuple] = []
    for part in normalize_parts(parts):
        if any(part in src.parts for src, _, _ in done):
            continue
        failures, candidates = [], sources_for(v, part, source, revision)
        if download.offline() and not any(download.cached(s) for s in candidates):
            raise not_found(v, part, os.environ.get(WEIGHTS_ENV), candidates)
        for src in candidates:
            try:
                path = download.cached(src) or download.fetch(src)
            except download.DownloadFailed as e:
                failures.append(str(e))
                continue
            done.append((src, path, download.sha256_of(path)))
            break
        else:
            raise TaesdError(f"cannot download the {v.name} {part}: " + "; then ".join(failures))
    return done


def run(args) -> int:
    for src, path, sha in fetch_parts(args.variant, args.parts, args.source, args.revision):
        print(f"{args.variant} {'+'.join(src.parts)}: {download.url_of(src)}")
        print(f"  sha256 {sha}")
        print(f"  cached {download.location(src, path)}")
    return 0
