"""This process's memory cgroup: where its files are, and the limit it sets.

Why it exists: a container or a systemd unit caps a device's memory below what
``/proc/meminfo`` reports, so ``sft-edge doctor`` must read that cap, and
``benchmarks.edge_budget`` makes a capped child cgroup beside this process's own. Both find
the cgroup the same way, in either layout: v1 names a ``memory`` controller on its line of
``/proc/self/cgroup``, v2 has one unified ``0::`` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

UNLIMITED = 1 << 60  # v1 writes a huge number for "no limit" (v2 writes "max")


@dataclass(frozen=True)
class CgroupFiles:
    """One layout's files: its mount point, the limit files (memory, then memory + swap or swap), OOM kills."""

    root: str
    limit: tuple[str, str]
    oom_kills: tuple[str, str]  # file and the key counting OOM kills in it


CGROUP_V1 = CgroupFiles("/sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"),
                        ("memory.oom_control", "oom_kill"))
CGROUP_V2 = CgroupFiles("/sys/fs/cgroup", ("memory.max", "memory.swap.max"), ("memory.events", "oom_kill"))


def memory_cgroups() -> Iterator[tuple[CgroupFiles, Path]]:
    """Each memory cgroup ``/proc/self/cgroup`` puts this process in, with its layout (none if unreadable)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            files = CGROUP_V1
        elif controllers == "":
            files = CGROUP_V2
        else:
            continue
        yield files, Path(files.root) / path.lstrip("/")


def memory_limit() -> int | None:
    """The memory limit of this process's cgroup in bytes; ``None`` when there is none or it is unreadable."""
    for files, group in memory_cgroups():
        try:
            text = (group / files.limit[0]).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < UNLIMITED:
            return int(text)
    return None
