"""Planning a batch's outputs before any work, so that nothing a user owns is lost:

- names keep the input's full stem and, under an output folder, its folder below the folder argument
  (``output_path``; the names themselves come from ``taesd.io.naming``);
- two inputs that would write one output, an output onto an input (or a weight file being read)
  and an output that can never be a file (a folder, a path under a file) are refused up front;
- an existing output is refused up front (the first one is named) unless ``overwrite`` (replace it,
  if taesd wrote it: it carries taesd's marker) or ``skip_existing`` (leave it, skip that input);
- every output folder is probed for writing (a temporary file made and removed) before any work.
The rule holds again at the moment each file is written (``taesd.io.files.output_policy``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from taesd.errors import TaesdError
from taesd.io.files import check_output_target, check_replaceable, os_error_message
from taesd.io.inputs import InputFile


def output_path(out: str | None, src: InputFile, name: str, single: bool) -> Path:
    """Where ``src``'s output ``name`` (from ``taesd.io.naming``) goes: beside it (no ``-o``); ``-o``
    itself when one input is given and it has a suffix (and is no folder); else inside the ``-o``
    folder, below the same relative folder."""
    if out is None:
        return src.path.parent / name
    o = Path(out)
    if single and o.suffix and not o.is_dir():
        return o
    return o / src.relative_folder / name


def _key(p: Path) -> str:
    return os.path.realpath(p)


def plan_outputs(jobs: "Sequence[tuple[InputFile, list[Path]]]", protected: Sequence[Path] = (),
                 overwrite: bool = False, skip_existing: "bool | None" = None,
                 note: Callable[[str], None] = print) -> list[tuple[InputFile, list[Path]]]:
    """Check every planned output before any work (the module docstring's rules); returns the jobs to
    run. ``skip_existing`` None: the caller offers no way to skip (the error does not suggest one);
    ``note`` hears which inputs were skipped."""
    reading = {_key(f.path): f.path for f, _ in jobs}
    reading.update({_key(p): p for p in protected if Path(p).is_file()})
    writers: dict[str, InputFile] = {}
    for src, dsts in jobs:
        for dst in dsts:
            k = _key(dst)
            if k in reading:
                raise TaesdError(f"the output for {src.path} would be {dst}, a file this run reads; "
                                 f"choose another -o")
            if k in writers:
                raise TaesdError(f"{writers[k].path} and {src.path} would both write {dst}; rename one "
                                 f"or write them to different -o folders")
            writers[k] = src
            check_output_target(dst)
    check_writable_folders([d for _, dsts in jobs for d in dsts])
    existing = [(src, dsts) for src, dsts in jobs if any(d.exists() for d in dsts)]
    if not existing:
        return list(jobs)
    if overwrite:
        for _, dsts in existing:
            for d in dsts:
                check_replaceable(d)
        return list(jobs)
    first = next(d for d in existing[0][1] if d.exists())
    if skip_existing:
        note(f"skipped {len(existing)} input(s) whose output exists (e.g. {first})")
        return [j for j in jobs if j not in existing]
    more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
    batch = ", --skip-existing to skip it" if skip_existing is not None else ""
    raise TaesdError(f"{first} exists{more}; pass --overwrite to replace it{batch}")


def check_writable_folders(targets: Sequence[Path]) -> None:
    """Probe, once per folder, that files can be made where the outputs go (a temporary file made
    and removed in the nearest folder that exists): a read-only or foreign folder is found before
    any input is encoded, not after."""
    probed: set[str] = set()
    for target in targets:
        folder = next((p for p in Path(target).parents if p.exists()), Path("."))
        if _key(folder) in probed:
            continue
        probed.add(_key(folder))
        try:
            fd, name = tempfile.mkstemp(prefix=".taesd-probe.", dir=folder)
        except OSError as e:
            raise TaesdError(os_error_message(e, Path(target))) from e
        os.close(fd)
        os.unlink(name)
