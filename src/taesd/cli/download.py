"""taesd download: fetch a variant's published weights into the cache, verified, and say where."""
from __future__ import annotations

from taesd.cli.common import command_parser
from taesd.io.weights import download
from taesd.io.weights.download import SOURCES
from taesd.io.weights.read import sha256_of
from taesd.registry import PARTS, VARIANTS


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


def run(args) -> int:
    seen = set()
    for src, path in download.fetch_parts(args.variant, args.parts, args.source, args.revision).values():
        if path in seen:
            continue
        seen.add(path)
        print(f"{args.variant} {'+'.join(src.parts)}: {download.url_of(src)}")
        print(f"  sha256 {sha256_of(path)}")
        print(f"  cached {download.location(src, path)}")
    return 0
