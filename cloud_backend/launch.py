"""Start ``sft-cloud`` as a child process and learn the URL it listens on.

Why it exists: the tests, the demo and the benchmarks run a real ``sft-cloud``, mostly on
``--port 0``; the one line it prints on stdout once it listens (``LISTENING`` + URL) is how
they learn the port (with ``--status-port``, a second line: ``STATUS`` + the status port's URL).
Standard library only: starting the server needs no torch here.
"""

from __future__ import annotations

import subprocess
import sys
from typing import IO, Sequence

LISTENING = "sft-cloud listening on "
STATUS = "sft-cloud status on "


class CloudDidNotStart(RuntimeError):
    """The child exited, or printed something else, before it listened."""


def cloud_command(*options: str, prefix: Sequence[str] = ()) -> list[str]:
    """``sft-cloud OPTIONS`` with this Python (``prefix``: e.g. a network namespace's ``ip netns exec``)."""
    return [*prefix, sys.executable, "-m", "cloud_backend.cli", *options]


def start_cloud(command: Sequence[str], *, log: IO[str] | None, env: dict[str, str] | None = None,
                cwd: str | None = None) -> subprocess.Popen[str]:
    """The child, its stdout a pipe for ``read_url`` and its stderr (the JSON event log) into ``log``:
    a file, since a full pipe would block it."""
    return subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=cwd)


def read_url(process: subprocess.Popen[str]) -> str:
    """Wait for the line that says the child listens; its URL. Kills the child if it says anything else."""
    line = process.stdout.readline()
    if not line.startswith(LISTENING):
        process.kill()
        process.wait()
        raise CloudDidNotStart(f"sft-cloud did not start (exit {process.returncode}): {line!r}")
    return line[len(LISTENING):].strip()


def read_status_url(process: subprocess.Popen[str]) -> str:
    """After ``read_url``, for a child started with ``--status-port``: the status port's URL."""
    line = process.stdout.readline()
    if not line.startswith(STATUS):
        raise CloudDidNotStart(f"sft-cloud printed no status URL: {line!r}")
    return line[len(STATUS):].strip()
