"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

Every writer in the engine (images, reports, plots, model weights, checkpoints, archives)
writes to a hidden temporary file in the destination folder, `.tmp-<random>-<name>`, and
renames it onto the destination with one `os.replace`. On any error, and on Ctrl-C, the
temporary file is removed and an existing destination is left exactly as it was. The
temporary name ends with the destination's own name, so writers that choose the format from
the extension (SimpleITK, matplotlib) see the right one. Files get the usual permissions
(the process umask), as if written in place.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"
"""Temporary files start with this (tests and cleanup code recognise them by it)."""


def temporary_path(path: str | os.PathLike[str], suffix: str | None = None) -> Path:
    """A fresh hidden name beside `path` ending with `path`'s name (or with `suffix`)."""
    path = Path(path)
    ending = f"-{path.name}" if suffix is None else suffix
    return path.parent / f"{TMP_PREFIX}{secrets.token_hex(6)}{ending}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], fsync: bool = False, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; on a normal exit it replaces `path` in one rename.

    `fsync` flushes the file to disk before the rename (checkpoints: the rename must not
    reach the disk before the data). `suffix` ends the temporary name instead of `path`'s
    name (a writer that knows the format by a normalised extension). The folder must exist;
    errors propagate unchanged.
    """
    target = Path(path)
    tmp = temporary_path(target, suffix)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], data: str | bytes, fsync: bool = False,
                 make_parents: bool = True) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically; returns the path."""
    target = Path(path)
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, fsync=fsync) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return target


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh hidden folder beside `path` to fill; on a normal exit it becomes `path`.

    The temporary name is unique per call (`temporary_path`), so two processes filling the
    same destination never share a folder. An existing `path` is moved aside first and removed
    after the rename (a reader may briefly find no folder, never a half-filled one); if another
    process put `path` in place in between, its folder is kept and ours discarded. On any
    error, and on Ctrl-C, the temporary folder is removed and `path` is left as it was.
    """
    target = Path(path)
    tmp = temporary_path(target)
    tmp.mkdir()
    try:
        yield tmp
        old = temporary_path(target, "-old")
        try:
            target.rename(old)
        except FileNotFoundError:
            pass                                 # nothing to move aside
        try:
            tmp.rename(target)
        except OSError:                          # another process's folder got there first
            if not target.is_dir():
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
