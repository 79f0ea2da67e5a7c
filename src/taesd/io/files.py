"""Writing files safely: an output appears whole or not at all, with the usual permissions.

- ``atomic_path(path)`` yields a hidden temporary file beside ``path`` (``.NAME.XXXX.tmp.SUFFIX``)
  and renames it over ``path`` only when the block succeeds; any exception (KeyboardInterrupt, the
  CLI's SIGTERM exception included) removes the temporary file. Before the rename the file gets
  ``0666 & ~umask``, like a file any other program creates (it is created 0600).
- ``OSError`` while creating or writing (read-only disk, full disk, no permission, a path under a
  file) becomes a one-line ``TaesdError`` naming the path; a directory as the target is refused.
- ``deferred_renames()``: inside it, every ``atomic_path`` keeps its finished temporary file and the
  renames happen together when the block ends, after ``check`` approved every target. Commands
  whose output names are decided deep inside a writer (weights, ONNX) use it so that a refused
  target (an input, an existing file) leaves nothing written at all.
- ``output_policy(overwrite)``: the commands' no-clobber guarantee, held at the moment of writing and
  not only when the batch was planned. ``overwrite=False``: the finished file is hard-linked to its
  name, which fails if anything appeared there meanwhile (another process, a user): one line, the
  other file left alone. ``overwrite=True``: an existing file is replaced only if it carries taesd's
  marker (``taesd.io.naming.has_taesd_marker``). Outside the block (the library, training's own
  checkpoints and logs) a finished file replaces its target, as ``os.replace`` does.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import secrets
import signal
from pathlib import Path
from typing import Callable, Iterator

from taesd.errors import TaesdError

_pending: contextvars.ContextVar["list[tuple[Path, Path]] | None"] = contextvars.ContextVar(
    "taesd_pending_renames", default=None)
# None: replace (the library's default); False: never replace; True: replace only taesd's own files.
_overwrite: contextvars.ContextVar["bool | None"] = contextvars.ContextVar("taesd_overwrite", default=None)


@contextlib.contextmanager
def output_policy(overwrite: bool) -> Iterator[None]:
    """Inside the block, finished files are published under the no-clobber rule (module docstring)."""
    token = _overwrite.set(bool(overwrite))
    try:
        yield
    finally:
        _overwrite.reset(token)


def check_replaceable(path: Path) -> None:
    """Refuse to replace ``path`` unless taesd wrote it (it carries taesd's marker, for the formats
    that have room for one)."""
    from taesd.io.naming import carries_markers, has_taesd_marker
    if path.is_file() and carries_markers(path) and not has_taesd_marker(path):
        raise TaesdError(f"{path} exists and was not written by taesd (it has no taesd marker); --overwrite "
                         f"replaces only taesd's own outputs: move it away or choose another -o")


def publish(tmp: Path, path: Path) -> None:
    """Give the finished temporary file ``tmp`` its name ``path`` under the current output policy."""
    overwrite = _overwrite.get()
    if overwrite is None:
        os.replace(tmp, path)
        return
    if overwrite:
        check_replaceable(path)
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)   # atomic, and fails if the name exists: no window between check and write
    except FileExistsError:
        raise TaesdError(f"{path} appeared while taesd was writing it (another process?); it was left as "
                         f"it is; pass --overwrite to replace it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        _claim_then_replace(tmp, path)   # a file system without hard links
        return
    tmp.unlink(missing_ok=True)


def _claim_then_replace(tmp: Path, path: Path) -> None:
    """No hard links: claim the name with O_EXCL (fails if it exists), then rename over the claim."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        raise TaesdError(f"{path} appeared while taesd was writing it (another process?); it was left as "
                         f"it is; pass --overwrite to replace it") from None
    os.replace(tmp, path)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set-and-restore."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def os_error_message(e: OSError, path: Path) -> str:
    """One line for an OSError met while writing ``path``."""
    reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied", errno.EFBIG: "the file is too large for this file system",
              errno.ENOTDIR: "a part of the path is a file, not a folder",
              errno.EISDIR: "it is a folder"}.get(e.errno, e.strerror or str(e))
    return f"cannot write {path}: {reason}"


def io_failure(e: BaseException) -> "str | None":
    """The reason, when an exception from a writer is an I/O failure in disguise (safetensors' Rust
    errors carry ``os error N``; torch.save raises RuntimeError 'file write failed')."""
    if isinstance(e, OSError):
        return None
    text = str(e)
    m = re.search(r"os error (\d+)", text)
    if m:
        code = int(m.group(1))
        return os_error_message(OSError(code, os.strerror(code)), Path("")).split(": ", 1)[1]
    if isinstance(e, RuntimeError) and ("file write failed" in text or "unexpected pos" in text):
        return "writing failed (is the disk full?)"
    return None


def check_output_target(path: Path) -> None:
    """Refuse, in one line, a target that can never become a file: a folder, or a path under a file."""
    if path.is_dir():
        raise TaesdError(f"cannot write {path}: it is a folder; name a file or a folder to write into")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TaesdError(f"cannot write {path}: {parent} is a file, not a folder")
            break


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while the temporary file is created and recorded: a signal then
    lands inside the block that removes it, never between its creation and that block."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _temporary_name(path: Path) -> Path:
    """``.NAME.XXXXXXXX.tmp.SUFFIX`` beside ``path``, a random name not yet created."""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    check_output_target(path)
    tmp = None
    try:
        with _signals_held():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Named before it exists: the signals are held only in this thread, and a SIGTERM that
            # another thread takes (PyTorch's OpenMP workers) still raises here at the next bytecode,
            # so the file must never exist under a name only the creating call knows (mkstemp's).
            for _ in range(100):
                tmp = _temporary_name(path)
                try:
                    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                    break
                except FileExistsError:
                    tmp = None
            if tmp is None:
                raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        pending = _pending.get()
        if pending is not None:
            pending.append((tmp, path))
        else:
            publish(tmp, path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise TaesdError(os_error_message(e, path)) from e
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        reason = io_failure(e)
        if reason is not None:
            raise TaesdError(f"cannot write {path}: {reason}") from e
        raise


@contextlib.contextmanager
def deferred_renames(check: "Callable[[list[Path]], None] | None" = None) -> Iterator[None]:
    """Hold back every ``atomic_path`` rename in the block; at its end ``check(targets)`` may refuse
    (nothing is renamed, every temporary file is removed), else all are renamed."""
    if _pending.get() is not None:  # nested: the outer block renames
        yield
        return
    pending: list[tuple[Path, Path]] = []
    token = _pending.set(pending)
    try:
        yield
        _pending.reset(token)
        token = None
        targets = [dst for _, dst in pending]
        if len(set(targets)) != len(targets):
            dup = next(t for t in targets if targets.count(t) > 1)
            raise TaesdError(f"{dup} would be written twice; nothing was written")
        if check is not None:
            check(targets)
        for tmp, dst in pending:
            try:
                publish(tmp, dst)
            except OSError as e:
                raise TaesdError(os_error_message(e, dst)) from e
    finally:
        if token is not None:
            _pending.reset(token)
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
