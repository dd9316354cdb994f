"""Write a file or a directory atomically: temp beside it, fsync, rename, fsync the parent.

Why it exists: checkpoints (the cloud's files, the edge's directories) and bundles are read
back after a crash (kill -9, power loss), so each must be either the old complete one or the
new complete one, never a torn one. Both sides use it, so it needs the standard library
alone. A crash during a file's write leaves its temp file behind; ``remove_stale_temp_files``
clears them at start-up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


TEMP_SUFFIX = ".tmp"


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temp_path)``, then make its result appear at ``path`` in one step."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def publish_directory(staging: Path, final: Path) -> None:
    """Make the complete directory ``staging`` appear as ``final`` (which must not exist) in one step:
    on disk before it is named, so a crash leaves no ``final`` or the whole of it."""
    fsync_tree(staging)
    os.rename(staging, final)
    fsync_dir(final.parent)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``."""
    for directory, _, names in os.walk(root):
        for name in names:
            with open(Path(directory) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(directory))


def fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_stale_temp_files(directory: Path) -> tuple[int, int]:
    """Delete the temp files that crashed writers left in ``directory``: how many, and their bytes.
    Only for start-up, when no writer of this directory is running."""
    count = size = 0
    for tmp in directory.glob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file():
            size += tmp.stat().st_size
            tmp.unlink(missing_ok=True)
            count += 1
    return count, size
