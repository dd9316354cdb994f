"""Progress lines for the slow steps of an export, with their timings, on stderr; the libraries' chatter aside.

Why it exists: loading a model, the SVD, tracing and building training graphs take from
seconds to minutes at bert-base size; every exporter step reports through one ``log``
callable so the CLI prints them and tests or benchmarks can collect them. The libraries
underneath talk too: the torch exporter logs a notice per graph node ("nn_module_stack
not found …", about a thousand lines at MiniLM size), transformers prints a load report and
progress bars. ``library_chatter`` collects those records (the export writes them to
``export.log`` in the bundle) and lets errors through to stderr.
"""

from __future__ import annotations

import io
import logging
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


# Loggers that carry their own stderr handler and do not propagate (torch sets up the first two).
CHATTY_LOGGERS = ("torch", "torch.onnx", "transformers")


@contextmanager
def library_chatter() -> Iterator[io.StringIO]:
    """While inside, the ``CHATTY_LOGGERS``' records go to the yielded buffer; ERROR and worse also to stderr."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.get_logger()  # installs transformers' own handler now, so that it is the one set aside
    buffer = io.StringIO()
    to_buffer = logging.StreamHandler(buffer)
    to_buffer.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.ERROR)
    saved = {}
    for name in CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = logger.handlers[:], logger.propagate
        logger.handlers[:] = [to_buffer, to_stderr]
        logger.propagate = False
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield buffer
    finally:
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).propagate = propagate
        if bars:
            transformers_logging.enable_progress_bar()
