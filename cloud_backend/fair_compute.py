"""One compute thread shared fairly by sessions: the least recent compute time goes first.

Why it exists: the cloud trains and predicts on one worker thread (one GPU stream), so that
each session's generator swaps never race and steps stay deterministic. In plain FIFO order
a few sessions looping large PREDICT batches make every other session wait behind all of
their jobs (tests/test_fair_compute.py shows it). Here each session's compute
seconds are counted, decaying with a half-life of ``HALF_LIFE_S``, and the waiting job of
the session that has used the least runs next (ties: first come). A session that asks for
little, such as one training at a small batch, passes the hogs and waits for at most the
one job already running; the hogs share what is left among themselves.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")
HALF_LIFE_S = 10.0


class FairCompute:
    """Run blocking functions on one worker thread, one at a time, fairly across ``key``s."""

    def __init__(self, *, thread_name: str, history: int = 256) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._waiting: list[tuple[int, str, Callable[[], Any], asyncio.Future]] = []
        self._order = itertools.count()
        self._used: dict[str, tuple[float, float]] = {}  # key -> (compute seconds, when counted)
        self._running = False
        self.history: deque[str] = deque(maxlen=history)  # the keys of the last jobs started, for tests and logs

    async def run(self, key: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the worker thread, when ``key``'s turn comes."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((next(self._order), key, functools.partial(fn, *args, **kwargs), future))
        self._dispatch()
        return await future

    def usage(self, key: str, now: float | None = None) -> float:
        """``key``'s decayed compute seconds."""
        seconds, when = self._used.get(key, (0.0, 0.0))
        return seconds * 0.5 ** (((time.monotonic() if now is None else now) - when) / HALF_LIFE_S)

    def _dispatch(self) -> None:
        self._waiting = [job for job in self._waiting if not job[3].cancelled()]
        if self._running or not self._waiting:
            return
        now = time.monotonic()
        job = min(self._waiting, key=lambda job: (self.usage(job[1], now), job[0]))
        self._waiting.remove(job)
        _, key, call, future = job
        self._running = True
        self.history.append(key)
        began = time.perf_counter()
        done = asyncio.get_running_loop().run_in_executor(self._executor, call)
        done.add_done_callback(functools.partial(self._finished, key, began, future))

    def _finished(self, key: str, began: float, future: asyncio.Future, done: asyncio.Future) -> None:
        now = time.monotonic()
        self._used = {k: (self.usage(k, now), now) for k in self._used if self.usage(k, now) > 1e-6}
        self._used[key] = (self.usage(key, now) + time.perf_counter() - began, now)
        self._running = False
        if not future.cancelled():
            if done.exception() is not None:
                future.set_exception(done.exception())
            else:
                future.set_result(done.result())
        self._dispatch()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
