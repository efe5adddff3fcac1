"""Atomic file output: write under a temporary name in the target's directory, then rename.

An interrupted run (an exception, Ctrl-C, a killed process) leaves nothing under the final name:
either the previous file or directory stays, or the new one appears complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def temp_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh, unused temporary file name next to ``path`` (hidden, same filesystem)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def check_parent(path: Path, what: str) -> Path:
    """``path`` as a Path whose directory exists (clear error otherwise)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {what} {path}: no directory {path.parent}")
    return path


def check_writable(path: Path, what: str, *, make_parents: bool = False) -> Path:
    """Fail early, with a one-line reason, when ``path`` could not be written later: its
    directory (or, with ``make_parents``, its nearest existing ancestor) must exist and take a
    new entry. Call before long work so that its results are not lost at the end."""
    path = Path(path)
    parent = path.parent
    while make_parents and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {what} {path}: no directory {parent}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tailattn-probe.", dir=parent))
    except OSError as err:
        raise ValueError(f"cannot write {what} {path}: {err.strerror} ({parent})") from None
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename."""
    path = check_parent(Path(path), "file")
    tmp = temp_sibling(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` (removed first if present).

    On an exception the temporary directory is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
