"""Progress lines for the slow steps of an export, with their timings, on stderr.

Why it exists: loading a model, the SVD, tracing and building training graphs take from
seconds to minutes at bert-base size; every exporter step reports through one ``log``
callable so the CLI prints them and tests or benchmarks can collect them.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    print(f"sft-export: {message}", file=sys.stderr, flush=True)


@contextmanager
def timed(log: Log, what: str) -> Iterator[None]:
    """``log`` that ``what`` starts, then how long it took."""
    log(f"{what} …")
    start = time.perf_counter()
    yield
    log(f"{what}: done in {time.perf_counter() - start:.1f}s")
