"""The state dir's disk budget: what each saved session costs, and clean-up to a byte limit.

Why it exists: every session id that is evicted or saved leaves files in ``--state-dir``
(about 100 MB each for MiniLM, 1 GB for bert-base), and anyone who can open sessions can
open many. ``trim`` deletes the snapshots of the sessions used least recently (by file
time) until the directory fits ``max_bytes``, never those of the sessions it is told to
keep (the ones in memory, whose files a crash would need).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SESSION_GLOB = "session-*"


@dataclass(frozen=True)
class SavedSession:
    """One session's files in the state dir (its snapshots, and any set aside as corrupt)."""

    key: str  # the hashed session id in the file names
    paths: tuple[Path, ...]
    size: int
    mtime: float


def session_key(path: Path) -> str:
    """``session-<hash>.<snapshot>.safetensors[.corrupt]`` -> ``<hash>``."""
    return path.name.split(".", 1)[0].removeprefix("session-")


def saved_sessions(state_dir: Path) -> list[SavedSession]:
    """Each session's files, least recently written first."""
    groups: dict[str, list[tuple[Path, os.stat_result]]] = {}
    for path in state_dir.glob(SESSION_GLOB):
        try:
            groups.setdefault(session_key(path), []).append((path, path.stat()))
        except FileNotFoundError:  # removed meanwhile
            continue
    found = [SavedSession(key, tuple(p for p, _ in files), sum(s.st_size for _, s in files),
                          max(s.st_mtime for _, s in files)) for key, files in groups.items()]
    return sorted(found, key=lambda saved: saved.mtime)


def used_bytes(state_dir: Path) -> int:
    return sum(saved.size for saved in saved_sessions(state_dir))


def trim(state_dir: Path, max_bytes: int, *, keep: set[str]) -> list[SavedSession]:
    """Delete the least recently written sessions not in ``keep`` until at most ``max_bytes`` are used."""
    saved = saved_sessions(state_dir)
    used = sum(s.size for s in saved)
    deleted = []
    for session in saved:
        if used <= max_bytes:
            break
        if session.key in keep:
            continue
        for path in session.paths:
            path.unlink(missing_ok=True)
        used -= session.size
        deleted.append(session)
    return deleted
