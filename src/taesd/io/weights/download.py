"""Published weight files fetched from where users get them, verified and cached.

Contract:
- Hub files (``WeightFile.host == "hub"``) go through huggingface_hub into the Hugging Face cache
  (``HF_HUB_CACHE``/``HF_HOME``), from ``$HF_ENDPOINT`` (read at each call). GitHub files come from
  ``$TAESD_GITHUB_URL/<repo>/raw/<revision>/<file>`` (default https://github.com) into
  ``$TAESD_CACHE_DIR/weights/github/<repo>/<revision>/`` (default ``~/.cache/taesd``).
- A file is visible under its final name only once it is whole and verified: the sha256 the
  registry knows, else the hub's ETag where it is a sha256 (LFS) or a git blob id, else the hash
  recorded at the first download (``weights/sha256.json``), re-checked at every later use. Any failure
  (HTTP error, dropped connection, truncated or wrong bytes) leaves no file behind and raises a
  one-line ``TaesdError``; network failures raise ``DownloadFailed`` (the caller may try another source).
- ``TAESD_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``: nothing is fetched (``offline()`` says which is set).
"""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hf_constants
from tqdm import tqdm

from taesd import settings
from taesd.errors import TaesdError
from taesd.io.files import atomic_path
from taesd.io.weights.read import git_blob_sha1, sha256_of
from taesd.registry import Variant, WeightFile, get_variant
from taesd.version import __version__

DEFAULT_GITHUB_URL = "https://github.com"
DEFAULT_HUB_URL = "https://huggingface.co"
RECORDS = "sha256.json"
SOURCES = ("hub", "github")
# A host that does not answer within this many seconds is taken as unreachable for the rest of the
# process: no retries, no second wait (huggingface_hub alone would retry 5 times, ~25 s).
PROBE_TIMEOUT = 5.0
_CHUNK = 1 << 16
_unreachable: dict[str, str] = {}     # host URL -> why it could not be reached (this process)
_reachable: set[str] = set()


class DownloadFailed(TaesdError):
    """The file could not be fetched (network, HTTP status, dropped connection): nothing was kept."""


# ---------------------------------------------------------------- settings and places

def offline() -> str | None:
    """The setting that switches downloads off ("TAESD_OFFLINE=1", "HF_HUB_OFFLINE=1"), or None."""
    return settings.offline() or ("HF_HUB_OFFLINE=1" if hf_constants.HF_HUB_OFFLINE else None)


def cache_root() -> Path:
    return settings.cache_dir()


def weights_cache() -> Path:
    """The taesd cache of downloaded weights (GitHub files and the recorded hashes)."""
    return cache_root() / "weights"


def hub_cache() -> Path:
    return Path(hf_constants.HF_HUB_CACHE)


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT or DEFAULT_HUB_URL).rstrip("/")


def url_of(src: WeightFile, filename: str | None = None) -> str:
    """Where ``src`` is fetched from (its companion ``filename`` if given)."""
    name = filename or src.filename
    if src.host == "hub":
        return f"{hub_endpoint()}/{src.repo}/resolve/{src.revision}/{name}"
    return f"{settings.github_url(DEFAULT_GITHUB_URL)}/{src.repo}/raw/{src.revision}/{name}"


def github_path(src: WeightFile) -> Path:
    return weights_cache() / "github" / src.repo / src.revision / src.filename


def _hub_storage(src: WeightFile) -> Path:
    return hub_cache() / ("models--" + src.repo.replace("/", "--"))


def folder_for(src: WeightFile) -> Path:
    """The folder a user can put ``src``'s file in by hand so that it is found offline."""
    if src.host == "github":
        return github_path(src).parent
    return _hub_storage(src)


def location(src: WeightFile, path: Path) -> Path:
    """What the loader reads: the file, or the folder of a diffusers layout."""
    return path.parent if src.layout == "diffusers" else path


def sources_for(variant: str | Variant, part: str | None = None, source: str | None = None,
                revision: str | None = None) -> list[WeightFile]:
    """The published files of ``variant`` (holding ``part``) on ``source``, preferred first; with a
    ``revision``, the first of them pinned to it."""
    v = get_variant(variant)
    if source is not None and source not in SOURCES:
        raise TaesdError(f"unknown source {source!r}; use 'hub' or 'github'")
    found = [s for s in v.sources if (part is None or part in s.parts) and source in (None, s.host)]
    if not found and source is not None:
        hosts = sorted({s.host for s in v.sources if part is None or part in s.parts})
        raise TaesdError(f"{v.name} has no {part or 'weights'} on the {source}; its sources: "
                         f"{', '.join(hosts) or 'none'}")
    return [found[0].at(revision)] if revision and found else found


# ---------------------------------------------------------------- hashes

class _Damaged(Exception):
    """The record of hashes exists but cannot be read."""


def _records(strict: bool = False) -> dict[str, dict]:
    """The recorded hashes; a missing record is empty, a damaged one raises ``_Damaged`` (``strict``)
    or is empty: either way no file is trusted by it (see ``verify``)."""
    target = weights_cache() / RECORDS
    try:
        records = json.loads(target.read_text())
        if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
            raise ValueError("not a table of records")
        return records
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        if strict:
            raise _Damaged(f"{target} is damaged ({e})") from e
        return {}


def recorded_sha256(path: Path) -> str | None:
    return _records().get(str(Path(path).resolve()), {}).get("sha256")


def _record(path: Path, sha256: str, url: str) -> None:
    """Record the hash of a file this process has just downloaded and verified. A damaged record is
    replaced (its files lose their trust and are refused until downloaded again), never trusted."""
    try:
        records = _records(strict=True)
    except _Damaged:
        records = {}
    records = {k: r for k, r in records.items() if Path(k).exists()}   # forget deleted files
    records[str(Path(path).resolve())] = {"sha256": sha256, "url": url}
    target = weights_cache() / RECORDS
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")


def _expected(src: WeightFile, path: Path) -> tuple[str | None, str]:
    """(expected digest, what it is): the registry's sha256, the hub blob's ETag, or the record."""
    if src.sha256:
        return src.sha256, "the registry's sha256"
    blob = Path(path).resolve().name
    if src.host == "hub" and re.fullmatch(r"[0-9a-f]{64}", blob):
        return blob, "the hub's ETag (sha256)"
    if src.host == "hub" and re.fullmatch(r"[0-9a-f]{40}", blob):
        return blob, "the hub's ETag (git blob id)"
    return recorded_sha256(path), "the sha256 recorded at the first download"


def verify(src: WeightFile, path: Path, url: str) -> str:
    """The sha256 of ``path``, checked against what is known of ``src``: the registry's hash, the hub's
    ETag, or the hash recorded when this cache downloaded it. A cached file with none of these (its
    record deleted or damaged) is refused: trust is never granted on a later use."""
    size = Path(path).stat().st_size
    if src.size is not None and size != src.size:
        raise TaesdError(f"{url} gave {size:,} bytes, not the published {src.size:,}: refused (truncated or "
                         f"another file)")
    expected, what = _expected(src, path)
    if expected is None:
        try:
            _records(strict=True)
            why = f"{weights_cache() / RECORDS} has no record of it"
        except _Damaged as e:
            why = str(e)
        raise TaesdError(f"{path} has no known hash to check ({why}): refused, it may have been changed")
    digest = sha256_of(path)
    got = git_blob_sha1(path) if "git blob" in what else digest
    if got != expected:
        raise TaesdError(f"{url} hashes to {got[:16]}..., not {expected[:16]}... ({what}): refused "
                         f"(corrupted or replaced)")
    return digest


def _check_new(src: WeightFile, path: Path, url: str) -> str:
    """The sha256 of a file just downloaded: checked against the registry or the hub's ETag where
    known; otherwise returned to be recorded (an older record of the same path is superseded)."""
    expected, what = _expected(src, path)
    if expected is not None and "recorded" not in what:
        return verify(src, path, url)
    size = Path(path).stat().st_size
    if src.size is not None and size != src.size:
        raise TaesdError(f"{url} gave {size:,} bytes, not the published {src.size:,}: refused (truncated or "
                         f"another file)")
    return sha256_of(path)


# ---------------------------------------------------------------- the cache, without the network

def cached(src: WeightFile) -> Path | None:
    """The verified cached copy of ``src`` (no network), or None. A cached file that no longer
    matches its hash, or whose hash is not known, raises, naming the file to delete."""
    if src.host == "github":
        path = github_path(src)
        if not path.is_file():
            return None
    else:
        found = [huggingface_hub.try_to_load_from_cache(src.repo, f, revision=src.revision,
                                                        cache_dir=str(hub_cache()))
                 for f in (src.filename, *src.companions)]
        if not all(isinstance(f, str) for f in found):
            return None
        path = Path(found[0])
    try:
        verify(src, path, str(path))
    except TaesdError as e:
        raise TaesdError(f"cached {e}; delete {path} and run `taesd download` again") from e
    return path


# ---------------------------------------------------------------- downloads

def fetch(src: WeightFile, progress: bool = True) -> Path:
    """Download ``src`` (and its companions) unless the cache holds it; verify; return its path."""
    if offline():
        raise DownloadFailed(f"downloads are off ({offline()}): fetch {url_of(src)} into {folder_for(src)}")
    found = cached(src)
    if found is not None:
        return found
    probe(url_of(src))
    if src.host == "github":
        return _fetch_github(src, github_path(src), progress)
    return _fetch_hub(src, progress)


def probe(url: str) -> None:
    """Fail fast, in one line, when ``url``'s host (or the proxy in front of it) does not answer within
    ``PROBE_TIMEOUT`` seconds: refused, unknown name, unreachable, silence. It sends no HTTP request for
    a file: https hosts answer with a TLS handshake, http hosts to ``OPTIONS /``. Remembered for the
    rest of the process (a host that answered is not asked again)."""
    parts = urllib.parse.urlsplit(url)
    host = f"{parts.scheme}://{parts.netloc}"
    if host in _reachable:
        return
    if host in _unreachable:
        raise DownloadFailed(f"{host} cannot be reached ({_unreachable[host]})")
    proxy = _proxy_for(parts)
    https = parts.scheme == "https"
    target = proxy or (parts.hostname, parts.port or (443 if https else 80))
    try:
        with socket.create_connection(target, timeout=PROBE_TIMEOUT) as sock:
            if proxy is None and https:
                try:
                    ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname).close()
                except ssl.SSLError:
                    pass   # it answered; the download reports what is wrong with its certificate
            elif proxy is None:
                ask = f"OPTIONS / HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
                sock.sendall(ask.encode())
                if not sock.recv(1):
                    raise ConnectionError("it closed the connection without an answer")
    except socket.timeout:
        _unreachable[host] = f"no answer within {PROBE_TIMEOUT:g} s"
    except OSError as e:
        _unreachable[host] = _short(e)
    if host in _unreachable:
        raise DownloadFailed(f"{host} cannot be reached ({_unreachable[host]})")
    _reachable.add(host)


def _proxy_for(parts) -> tuple[str, int] | None:
    """The (host, port) of the proxy urllib/httpx would use for this URL, or None."""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return (p.hostname, p.port or 80) if p.hostname else None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _fetch_github(src: WeightFile, path: Path, progress: bool) -> Path:
    url = url_of(src)
    request = urllib.request.Request(url, headers={"User-Agent": f"taesd/{__version__}"})
    made = _missing_parents(path.parent)
    try:
        with atomic_path(path) as tmp:
            try:
                with urllib.request.urlopen(request, timeout=30) as response, open(tmp, "wb") as out:
                    total = response.length
                    received = _copy(response, out, total, src.filename, progress)
            except urllib.error.HTTPError as e:
                raise DownloadFailed(f"downloading {url} failed: HTTP {e.code} {e.reason}") from e
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                raise DownloadFailed(f"downloading {url} failed: {_short(e)}; nothing was kept") from e
            if total is not None and received != total:
                raise DownloadFailed(f"downloading {url} failed: {received:,} of {total:,} bytes arrived")
            digest = _check_new(src, tmp, url)
        _record(path, digest, url)
        return path
    except BaseException:
        _prune(made)
        raise


def _copy(response, out, total: int | None, name: str, progress: bool) -> int:
    received = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not progress,
              dynamic_ncols=True, leave=False) as bar:
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received


def _missing_parents(folder: Path) -> list[Path]:
    """The folders up to ``folder`` that do not exist yet, deepest first (to remove after a failure)."""
    made = []
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    return made


def _prune(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()} if root.exists() else set()


def _fetch_hub(src: WeightFile, progress: bool) -> Path:
    """hf_hub_download of the file and its companions; on any failure, every file this call added to
    the Hugging Face cache (blob, snapshot link, ref, lock) is removed again."""
    storage = _hub_storage(src)
    locks = hub_cache() / ".locks" / storage.name
    made = _missing_parents(storage)
    before = _files_under(storage) | _files_under(locks)
    try:
        paths = []
        for name in (src.filename, *src.companions):
            paths.append(Path(_hf_download(src, name, progress)))
        _record(paths[0], _check_new(src, paths[0], url_of(src)), url_of(src))
        return paths[0]
    except BaseException:
        for p in sorted((_files_under(storage) | _files_under(locks)) - before, reverse=True):
            p.unlink(missing_ok=True)
        for root in (storage, locks):
            _prune_tree(root)
        if hub_cache() in made:   # the whole cache is this call's: its tag and lock folder too
            (hub_cache() / "CACHEDIR.TAG").unlink(missing_ok=True)
            _prune([locks.parent])
        _prune(made)
        raise


def _prune_tree(root: Path) -> None:
    """Remove the empty folders under ``root`` (deepest first) and ``root`` itself if it is empty."""
    if not root.exists():
        return
    for d in sorted((d for d in root.rglob("*") if d.is_dir() and not d.is_symlink()), reverse=True):
        _prune([d])
    _prune([root])


def _hf_download(src: WeightFile, name: str, progress: bool) -> str:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        return huggingface_hub.hf_hub_download(src.repo, name, revision=src.revision,
                                               cache_dir=str(hub_cache()), endpoint=hub_endpoint())
    except Exception as e:   # every huggingface_hub/httpx error: say which file and why, in one line
        raise DownloadFailed(f"downloading {url_of(src, name)} failed: {_short(e)}; "
                             f"nothing was kept") from e
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()


# ---------------------------------------------------------------- per part: the cache, then the network

def fetch_parts(variant: str | Variant, parts, source: str | None = None, revision: str | None = None,
                fetch_missing: bool = True, progress: bool = True) -> dict[str, tuple[WeightFile, Path]]:
    """{part: (published file, its verified path)}: per part the first source the cache holds, else
    (``fetch_missing``) the first that downloads; each file once. Nothing found: one line saying
    which file to fetch, where to put it, and the settings that decide (``not_found``)."""
    from taesd.registry import normalize_parts
    v = get_variant(variant)
    done: dict[str, tuple[WeightFile, Path]] = {}
    for part in normalize_parts(parts):
        same = next((hit for hit in done.values() if part in hit[0].parts), None)
        if same is not None:
            done[part] = same
            continue
        candidates = sources_for(v, part, source, revision)
        hit = next(((s, p) for s in candidates if (p := cached(s)) is not None), None)
        if hit is None and fetch_missing and not offline() and candidates:
            failures = []
            for src in candidates:
                try:
                    hit = (src, fetch(src, progress))
                    break
                except DownloadFailed as e:   # a network failure: the next source may work
                    failures.append(str(e))
            if hit is None:
                raise not_found(v, part, candidates, "; ".join(failures))
        if hit is None:
            raise not_found(v, part, candidates, None if fetch_missing else "not downloaded")
        done[part] = hit
    return done


def not_found(v: Variant, part: str, candidates: list[WeightFile], why: str | None = None) -> TaesdError:
    """One line: the file to fetch, the folders it is looked for in, the flag and settings, and why."""
    why = why or (f"downloads are off ({offline()})" if offline() else "it has no published source")
    env = settings.weights_path()
    github = next((s for s in candidates if s.host == "github"), None)
    first = github or (candidates[0] if candidates else None)
    name = first.filename if first else v.part_file(part)
    src = f" ({url_of(first)})" if first else ""
    where = [str(folder_for(github))] if github else []
    if env is not None and env.is_file():
        where.append(f"a folder named by TAESD_WEIGHTS (it names the file {env}, which holds no "
                     f"{v.name} {part})")
    else:
        where.append(f"$TAESD_WEIGHTS ({env})" if env else "a folder named by TAESD_WEIGHTS")
    switch = "" if offline() else "; TAESD_OFFLINE=1 skips the network"
    return TaesdError(f"no weights found for the {v.name} {part}: put {name}{src} in {' or '.join(where)}, "
                      f"or pass --weights PATH (weights= in Python){switch}; {why}")
