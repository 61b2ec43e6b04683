"""Atomic file output, the one way this project writes a file that someone may read.

A reader (grand-challenge collecting /output, a training run resumed after a crash, a second
process loading the cache) sees the old file or the whole new one, never a part; a write that
fails leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _extension(name: str) -> str:
    """The extension writers look at to pick a format (SimpleITK, numpy, matplotlib)."""
    return ".nii.gz" if name.lower().endswith(".nii.gz") else Path(name).suffix


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A fresh temporary path beside `path`, with the same extension, for the caller to write;
    it replaces `path` when the block ends without an error and is removed otherwise.

    The file gets the permissions a plain open() would give (mkstemp makes it private), so a file
    baked into the container stays readable for its non-root user.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=f".partial{_extension(path.name)}"
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Writes a UTF-8 text file atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
