"""A fleet's synchronous rounds across sft-cloud workers started by torchrun (``sft-cloud --distributed``).

Why it exists: each worker's ``CloudFleet`` sees only the devices connected to it, but the fleet
must make ONE step a round on one top part (``cloud_backend.distributed`` turns the workers'
shares into that step). So the workers agree, round by round, on which round comes next:

- **The header.** Before each round every worker all-reduces, per kind of round (train,
  checkpoint, average, in that order), whether it holds items of that kind and whether it waits
  for nobody more (all its members are in, or absent, or the round timeout has passed). A kind
  goes ahead when some worker holds items and every worker is ready; the first such kind is run
  on every worker, each with what it holds (possibly nothing: zero rows, zero gradients).
- **Timeouts.** A worker learns from the header when a round opened elsewhere, so a device that is
  gone makes its worker wait ``--round-timeout`` at most, as in one process. A worker with
  nothing ready enters the header every ``TICK_S`` (that is the cost: a few-byte all-reduce).
- **Quorum** is per worker: each waits for ``--fleet-quorum`` of its own devices before the
  fleet's first round, and a worker that never gets a device holds the fleet's rounds up.
- **Averaging** (FedAvg of the edge halves) is a round too: the workers all-reduce their members'
  example-weighted sums and example counts, and every member gets the average of all of them.
- **Checkpoints.** A checkpoint round writes, on every worker, its own state dir's file (the
  shared top, the same on all, and its own members' steps and replies), then a barrier: the
  devices hear "saved" only once every worker has written. No ``latest`` snapshot is written at
  shutdown, as the workers do not stop at one round; a restarted group resumes from the
  requested snapshot, and its workers check first that they all restored the same step
  (``common_step``). The window that remains: a worker killed after some peers wrote a
  checkpoint round and before it did leaves the group one checkpoint apart, and it refuses to
  start, saying so (remove the newer files to resume from the older).
- **A worker that dies** breaks its peers' next collective (gloo notices the closed connection at
  once, or the collective times out): they exit, and torchrun stops the group or, with
  ``--max-restarts``, starts it again, and it resumes from the checkpoint.

Header collectives may wait long for peers, so they run on a daemon thread of their own (a
stopping worker never waits for it); a round's own collectives run on the compute thread, where
its compute is (the dropout RNG swap must not race), and are short because every worker has
entered the round. Dropout: worker ``r``'s generator starts from the fleet's seed + ``r`` (its own
masks; worker 0's are those of one process). The asynchronous schedule stays on one worker for
now: ``sft-cloud --distributed`` refuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from cloud_backend.distributed import DataParallelTop, common_step
from cloud_backend.fleet import CloudFleet, _Job
from cloud_backend.rounds import Barrier
from cloud_backend.server import log_event
from splitwire.errors import ConfigMismatch

TICK_S = 0.02
KINDS = ("train", "checkpoint", "average")
GROUP_BROKEN = 70  # exit status of a worker whose group's collective failed (a peer died or timed out)


@dataclass(frozen=True)
class Offer:
    """What one worker brings to the header for one kind of round."""

    pending: bool  # it holds items of this kind
    ready: bool  # it waits for none of its members any more


def offer(barrier: Barrier, now: float, opened_at: float | None, timeout: float) -> Offer:
    """This worker's offer; ``opened_at``: when it learned that a round of this kind opened on some worker."""
    if not barrier.started:
        return Offer(bool(barrier.pending), False)
    late = any(t is not None and now >= t + timeout for t in (opened_at, barrier.opened_at))
    return Offer(bool(barrier.pending), late or not barrier.waiting_for())


def decide(summed: Sequence[int], world_size: int) -> str | None:
    """The round every worker runs next, from the header summed over the workers (``None``: none yet)."""
    for index, kind in enumerate(KINDS):
        pending, ready = summed[2 * index], summed[2 * index + 1]
        if pending > 0 and ready == world_size:
            return kind
    return None


def header(offers: Sequence[Offer]) -> list[int]:
    """One worker's header, an offer per kind in ``KINDS`` order; the workers' headers are summed."""
    return [int(v) for o in offers for v in (o.pending, o.ready)]


def _exchange(offers: Sequence[Offer]) -> list[int]:
    header_ = torch.tensor(header(offers), dtype=torch.int64)
    if dist.get_backend() == "nccl":
        header_ = header_.cuda()
    dist.all_reduce(header_)
    return header_.tolist()


class _DaemonThread:
    """Calls run one at a time on a daemon thread, awaited from the event loop."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, args, loop, future = self._calls.get()
            try:
                result = fn(*args)
                loop.call_soon_threadsafe(lambda r=result: future.done() or future.set_result(r))
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                loop.call_soon_threadsafe(lambda e=exc: future.done() or future.set_exception(e))

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls.put((fn, args, loop, future))
        return await future


class WorkerFleet(CloudFleet):
    """One worker's share of a synchronous fleet whose top part is data-parallel across the workers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.settings.schedule != "sync":
            raise ConfigMismatch("a fleet across sft-cloud workers runs the synchronous schedule only")
        self.parallel = DataParallelTop(self.top.model)
        if self.top.step == 0:  # each worker's rows draw their own dropout masks (rank 0: as in one process)
            self.top.seed_rng(self.top.config.seed + dist.get_rank())
        self._headers = _DaemonThread("fleet-header")

    async def run(self) -> None:
        """Agree on the starting step, then run every round the header decides, until cancelled."""
        try:
            await self._agree_on_start()
            await self._rounds()
        except RuntimeError as exc:
            self._broken(exc)

    def _broken(self, exc: RuntimeError) -> None:
        """A collective failed (a peer died or timed out; torch.distributed raises ``RuntimeError``):
        this worker cannot go on alone, so it ends, and torchrun stops or restarts the whole group."""
        log_event("worker_group_broken", fleet=self.name, rank=dist.get_rank(), error=str(exc)[:500])
        os._exit(GROUP_BROKEN)

    async def _agree_on_start(self) -> None:
        step = self.top.step
        agreed = await self._headers.run(lambda: common_step([step], device=self.parallel.device))
        if agreed != step:
            log_event("worker_steps_differ", fleet=self.name, rank=dist.get_rank(), step=step)
            raise RuntimeError(f"fleet {self.name!r}: this worker restored step {step}, another a different one "
                               "(a worker died while the group wrote a checkpoint); remove the newer checkpoint "
                               "files of the fleet to resume from the older")

    async def _rounds(self) -> None:
        barriers = {"train": self.trains, "checkpoint": self.checkpoints, "average": self.averages}
        rounds = {"train": self._train_round, "checkpoint": self._checkpoint_round, "average": self._average_round}
        opened: dict[str, float | None] = dict.fromkeys(KINDS)
        world_size = dist.get_world_size()
        while True:
            self._changed.clear()
            offers = self._offers(barriers, opened)
            if not any(o.pending and o.ready for o in offers):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), TICK_S)
                offers = self._offers(barriers, opened)
            summed = await self._headers.run(_exchange, offers)
            now = time.monotonic()
            for index, kind in enumerate(KINDS):
                if summed[2 * index] > 0 and opened[kind] is None:
                    opened[kind] = now
            kind = decide(summed, world_size)
            if kind is not None:
                opened[kind] = None
                await self._run_round(rounds[kind], [job for _, job in barriers[kind].take(now, force=True)])

    def _offers(self, barriers: dict[str, Barrier], opened: dict[str, float | None]) -> list[Offer]:
        now = time.monotonic()
        return [offer(barriers[kind], now, opened[kind], self.settings.round_timeout) for kind in KINDS]

    async def _run_round(self, run: Callable[[list[_Job]], Awaitable[None]], jobs: list[_Job]) -> None:
        """As in one process (a failed round: every member hears why), but a failed collective ends the group."""
        async def or_broken(jobs: list[_Job]) -> None:
            try:
                await run(jobs)
            except RuntimeError as exc:
                self._broken(exc)

        await super()._run_round(or_broken, jobs)

    async def _save(self, snapshot: str) -> None:
        await super()._save(snapshot)
        if snapshot == "requested" and self._snapshot(snapshot) is not None:
            await self.compute.run(self.key, dist.barrier)  # every worker has written: the round is committed

    async def save_latest(self) -> bool:
        """Nothing is written: the workers do not stop at one round, so their ``latest`` files would not agree."""
        return False

    def _average_weights(self, weights: list[dict[str, np.ndarray]], examples: list[int]) -> dict[str, np.ndarray]:
        """FedAvg over every worker's members in this round: ``Σ nᵢ·wᵢ`` and ``Σ nᵢ`` summed here in float64,
        all-reduced (a worker without members adds zeros), then divided; float32, as the edges keep them."""
        names = sorted(self.shapes)
        sizes = [math.prod(self.shapes[name]) for name in names]
        sums = np.zeros(1 + sum(sizes))
        sums[0] = sum(examples)
        for device, n in zip(weights, examples):
            sums[1:] += n * np.concatenate([np.asarray(device[name], np.float64).reshape(-1) for name in names])
        reduced = torch.from_numpy(sums).to(self.parallel.device)
        dist.all_reduce(reduced)
        total = reduced.cpu().numpy()
        chunks = np.split(total[1:] / total[0], np.cumsum(sizes)[:-1])
        return {name: chunk.reshape(self.shapes[name]).astype(np.float32) for name, chunk in zip(names, chunks)}
