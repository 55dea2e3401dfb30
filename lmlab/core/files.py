"""Files that are either the old version or the whole new one (checkpoints, token shards, caches, meta.json)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")


def write_atomically(path: str | Path, write: Callable[[IO[bytes]], T]) -> T:
    """Write ``path`` through ``write(file)`` into a temporary file in the same folder, fsync it, rename it over
    ``path`` and fsync the folder: a crash at any moment leaves the previous file or the complete new one, and a
    reader never sees a partial file. A failed write (a full disk) removes the temporary file and raises, the
    previous file untouched. Returns what ``write`` returns. The temporary file lies beside the target because a
    rename is atomic only within one filesystem (a move from ``$TMPDIR`` may be a copy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)
    return result
