"""Write a file atomically: temp file beside it, fsync, rename, fsync the directory.

Why it exists: a checkpoint is read back after a crash (kill -9, power loss), so it must be
either the old complete file or the new complete file, never a torn one. A crash during the
write leaves the temp file behind; ``remove_stale_temp_files`` clears them at start-up.
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
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        tmp.unlink(missing_ok=True)


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
