"""fsync helpers for the write-then-rename pattern: a folder renamed into place must have its
files and directory entries on disk first, or a power cut can surface it half-written."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Flush a directory's entries (new names, renames) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and directory under `folder`, then `folder` itself."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in [p for p in folder.rglob("*") if p.is_dir()]:
        fsync_dir(path)
    fsync_dir(folder)
