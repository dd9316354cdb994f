"""The cloud's compute thread is shared by compute time, not by arrival order."""

from __future__ import annotations

import asyncio
import time

from cloud_backend.fair_compute import FairCompute


def test_a_cheap_session_waits_for_at_most_one_job_of_each_hog_and_results_come_back():
    """Three sessions loop 40 ms jobs (large PREDICT batches), one loops 4 ms jobs (its training
    steps), all on the one worker thread. In arrival order each cheap job would wait for all
    three hogs' jobs; here at most one hog job (the one running when it arrived) runs between
    two cheap ones, and every job's result (and exception) reaches its caller."""
    async def loop(compute: FairCompute, key: str, seconds: float, jobs: int) -> list[int]:
        return [await compute.run(key, lambda i=i: (time.sleep(seconds), i)[1]) for i in range(jobs)]

    async def scenario():
        compute = FairCompute(thread_name="test")
        try:
            results = await asyncio.gather(*(loop(compute, f"hog-{i}", 0.04, 6) for i in range(3)),
                                           loop(compute, "trainer", 0.004, 10))
            try:
                await compute.run("trainer", lambda: 1 / 0)
            except ZeroDivisionError:
                results.append("raised")
            return results, list(compute.history)
        finally:
            compute.shutdown()

    results, history = asyncio.run(scenario())
    assert results[:3] == [list(range(6))] * 3 and results[3] == list(range(10)) and results[4] == "raised"
    trainer = [i for i, key in enumerate(history) if key == "trainer"]
    gaps = [b - a - 1 for a, b in zip(trainer, trainer[1:])]
    assert max(gaps[:9]) <= 1, history  # FIFO would put all three hogs between two trainer jobs
    assert sum(key.startswith("hog") for key in history[:trainer[9]]) <= 12
