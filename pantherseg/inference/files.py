"""Atomic file output, the one way this project writes a file that someone may read.

A reader (grand-challenge collecting /output, a training run resumed after a crash, a second
process loading the cache) sees the old file or the whole new one, never a part; a write that
fails leaves nothing behind. JSON meant for other programs is strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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


def atomic_write_json(path: Path, value: Any, indent: int = 2) -> None:
    """Writes `value` as strict JSON, atomically: a non-finite number (an overflowed float16
    check, a metric with no value) becomes null, since Python's `Infinity` and `NaN` are not JSON
    and other readers (JavaScript, jq, most JSON libraries) refuse the whole file."""
    text = json.dumps(_finite_or_null(value), indent=indent, allow_nan=False)
    atomic_write_text(path, text + "\n")


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value
