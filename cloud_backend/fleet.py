"""A fleet on the cloud: sessions that share one top part and one optimizer (split federated learning).

Why it exists: many devices of one organisation train one model together. Sessions whose
hello names the same fleet train ONE ``CloudSession`` (the shared top part, its AdamW and
dropout RNG; its ``step`` counts the fleet's cloud steps), while each device keeps its own
step order and replay cache (``splitwire.steps.CloudSteps``) and its own edge half.

Schedules (``cloud_backend.rounds`` holds their rules without I/O):

- ``sync``: a round takes one batch from every member, stacks them in the fleet's fixed
  order (session ids sorted) and makes one step (``models.fleet.joint_loss``); it goes ahead
  after ``round_timeout`` without a member that dropped, which rejoins by sending again.
  Deterministic: it equals ``models.fleet.Fleet`` trained in one process. A checkpoint is a
  round too: the fleet is saved once every member has asked for it at the same step (so
  each has its own edge checkpoint of that step), which is what lets a cloud killed with
  ``kill -9`` come back at a step every device can meet.
- ``async``: requests are applied as they arrive; those that arrive together (up to
  ``max_rows`` rows, within ``max_wait`` of the first) are stacked into one step.

Averaging (FedAvg, ``splitwire.fedavg``) is a round of its own: members send their trainable
edge weights and example counts, and every one of them gets the example-weighted average.
Only edge weights travel, never data.

A *shared edge* (``edge="shared"``, sync only) keeps the edge halves one model: after each
train round every member sends its edge gradient (its part of the round's one loss) and gets
the sum over the round's members, so every device applies the same AdamW step, as one device
training on the round's stacked batch would (``models.fleet.Fleet(shared_edge=True)``). Each
train round opens its own gradient round, expecting exactly its members
(``cloud_backend.rounds.GradientRounds``). A gradient that comes after its round went ahead
(after ``round_timeout``) gets that round's sum, so its device stays one with the others; a
member that missed a whole train round (it was away) did not apply that round's sum and no
longer equals the others; an averaging round brings it back.

One asyncio task per fleet (``run``) takes ready rounds and runs them on the server's
compute thread; handlers wait on futures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
import torch

from cloud_backend.distributed import DataParallelTop
from cloud_backend.fair_compute import FairCompute
from cloud_backend.rounds import Barrier, Batcher, GradientRounds
from cloud_backend.session import MAX_GRADIENT, CloudSession, StepResult, read_checkpoint, write_checkpoint
from models import EdgePart, EncoderSpec, SplitSpec
from splitwire.bundle import Bundle
from splitwire.errors import ProtocolError, UsageError
from splitwire.fedavg import fedavg, gradient_sum
from splitwire.protocol import Average, Averaged, EdgeGradient, GradientSum, Kind, Train
from splitwire.steps import CloudSteps, Replay

log = logging.getLogger(__name__)
SCHEDULES = ("sync", "async")
EDGES = ("personal", "shared")  # the fleet's edge halves: each device's own, or one model kept in step
FLEET_PREFIX = "fleet:"  # the shared top part's session id (and state file name) is this and the fleet's name


@dataclass(frozen=True)
class FleetSettings:
    """How the cloud runs its fleets (``sft-cloud --fleet-*``)."""

    schedule: str = "sync"
    round_timeout: float = 30.0  # sync: a round goes ahead without the missing after this many seconds
    quorum: int = 1  # sync: the first round waits until this many devices have joined
    max_rows: int = 256  # async: rows stacked into one step at most
    max_wait: float = 0.005  # async: seconds a step waits for more requests after the first
    edge: str = "personal"  # EDGES: "shared" sums the members' edge gradients every round

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UsageError(f"the fleet schedule is one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.edge not in EDGES:
            raise UsageError(f"the fleet's edge is one of {', '.join(EDGES)}, got {self.edge!r}")
        if self.edge == "shared" and self.schedule != "sync":
            raise UsageError("a shared edge sums each round's edge gradients: it needs the sync schedule")
        if not (self.round_timeout > 0 and self.quorum >= 1 and self.max_rows >= 1 and self.max_wait >= 0):
            raise UsageError("fleet round timeout must be > 0, quorum and max rows >= 1, max wait >= 0")


def edge_shapes(bundle: Bundle) -> dict[str, tuple[int, ...]]:
    """The trainable edge weights' names and shapes (what averaging carries), without allocating them."""
    with torch.device("meta"):
        edge = EdgePart(EncoderSpec.from_dict(bundle.encoder), SplitSpec.from_dict(bundle.split))
    shapes = {name: tuple(p.shape) for name, p in edge.named_parameters()}
    return {name: shapes[name] for name in bundle.manifest.edge.trainable}


def _largest(tensors: dict[str, np.ndarray]) -> float:
    """The largest magnitude in ``tensors`` (0 when they are empty)."""
    return max((float(np.abs(t).max()) for t in tensors.values() if t.size), default=0.0)


@dataclass
class _Job:
    """A member's item waiting in a round, and the future its handler awaits."""

    member: str
    payload: Any
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class _TrainItem:
    request: Train
    digest: str
    answer: Callable[[StepResult], bytes]


class CloudFleet:
    """One fleet: the shared top part, its members' step orders, and its three kinds of round."""

    def __init__(self, name: str, top: CloudSession, settings: FleetSettings, *, compute: FairCompute,
                 shapes: dict[str, tuple[int, ...]], snapshot: Callable[[str], Path | None],
                 members: dict[str, CloudSteps] | None = None) -> None:
        self.name, self.top, self.settings, self.compute, self.shapes = name, top, settings, compute, shapes
        self._snapshot = snapshot  # "requested"/"latest" -> the file, None without a state dir
        self.members: dict[str, CloudSteps] = members or {}
        sync = settings.schedule == "sync"
        self.trains: Barrier | Batcher = (Barrier(settings.round_timeout, settings.quorum) if sync
                                          else Batcher(settings.max_rows, settings.max_wait))
        self.checkpoints: Barrier = Barrier(settings.round_timeout)
        self.averages: Barrier = Barrier(settings.round_timeout)
        self.gradient_sums: GradientRounds = GradientRounds(settings.round_timeout)
        self._train_rounds = 0  # shared edge: the train rounds so far, each opening its gradient round
        self._trained_in: dict[str, int] = {}  # each member's last train round
        self._summed: tuple[int, dict[str, np.ndarray]] | None = None  # the last gradient round: its number, its sum
        self.saved_step: int | None = None  # the cloud step of the last requested snapshot
        self.saved_members: dict[str, int] = {}  # each member's step in that snapshot
        self._in_flight: dict[str, _Job] = {}  # each member's step waiting for its round
        # each member's last AVERAGE and EDGE_GRADIENT: its step, its answer
        self._answered: dict[Kind, dict[str, tuple[int, asyncio.Future]]] = {Kind.AVERAGE: {}, Kind.EDGE_GRADIENT: {}}
        self._changed = asyncio.Event()
        self.parallel: DataParallelTop | None = None  # the top's collectives across workers (``cloud_backend.fleet_workers``)
        for member in self.members:
            self._join_barriers(member)

    @property
    def key(self) -> str:
        return self.top.session_id

    # ------------------------------------------------------------------ members

    def join(self, member: str) -> CloudSteps:
        """``member``'s step order in this fleet (new at step 0, or where it was)."""
        steps = self.members.setdefault(member, CloudSteps(member))
        self._join_barriers(member)
        self._changed.set()
        return steps

    def _barriers(self) -> list[Barrier]:
        return [queue for queue in (self.trains, self.checkpoints, self.averages) if isinstance(queue, Barrier)]

    def _join_barriers(self, member: str) -> None:
        for barrier in self._barriers():
            barrier.join(member)

    def leave(self, member: str) -> None:
        """``member`` said bye: rounds no longer wait for it (it may join again)."""
        for barrier in self._barriers():
            barrier.leave(member)
        self.gradient_sums.leave(member)
        self._changed.set()

    def resume(self, member: str, resume_from: int) -> None:
        """A member resuming from an older step than the fleet holds for it goes on from there: the shared
        top does not go back for one device, the device trains its own steps again."""
        steps = self.members[member]
        if not steps.meets(resume_from):
            self.members[member] = CloudSteps(member, step=resume_from)

    # ------------------------------------------------------------------ requests

    async def train(self, member: str, request: Train, digest: str, answer: Callable[[StepResult], bytes]) -> bytes:
        """Queue ``member``'s step for the next round (or batch); its reply once that step is applied."""
        waiting = self._in_flight.get(member)
        if waiting is not None and waiting.payload.request.step == request.step:  # resent after a reconnect
            return await asyncio.shield(waiting.future)
        self.members[member].check_next(request.step)
        job = self._in_flight[member] = _Job(member, _TrainItem(request, digest, answer))
        if isinstance(self.trains, Barrier):
            self.trains.submit(member, job, time.monotonic())
        else:
            self.trains.submit(member, job, request.z.shape[0], time.monotonic())
        return await self._wait(job)

    async def checkpoint(self, member: str, step: int) -> bool:
        """Persist the fleet once every member asked at this step (sync), or now (async)."""
        self.members[member].check_checkpoint(step)
        if self._snapshot("requested") is None:
            return False
        if self.saved_step == self.top.step and self.saved_members.get(member) == step:
            return True  # asked again after a reconnect (the reply was lost): it is saved, and no round waits for it
        if self.settings.schedule == "async":
            await self._save("requested")
            return True
        job = _Job(member, step)
        self.checkpoints.submit(member, job, time.monotonic())
        return await self._wait(job)

    async def average(self, member: str, request: Average) -> Averaged:
        """The example-weighted average of the edge weights of the members in this averaging round."""
        return await self._edge_round(Kind.AVERAGE, lambda job: self.averages.submit(member, job, time.monotonic()),
                                      member, request)

    async def sum_gradients(self, member: str, request: EdgeGradient) -> GradientSum:
        """The sum of the edge gradients of the members in this gradient round (a shared edge)."""
        if self.settings.edge != "shared":
            raise ProtocolError(f"fleet {self.name!r} keeps personal edge halves: it sums no edge gradients")
        if request.step != self.members[member].step:
            raise ProtocolError(f"an edge gradient is of the step the cloud applied last, {self.members[member].step}, "
                                f"got step {request.step}")
        largest = _largest(request.tensors)
        if largest > MAX_GRADIENT:  # it would poison every device's AdamW second moment
            raise ProtocolError(f"an edge gradient must stay within ±{MAX_GRADIENT:g}, got {largest:.3g}")
        number = self._trained_in.get(member)

        def submit(job: _Job) -> None:
            if number is not None and self.gradient_sums.is_open(number):
                job.payload = (number, request)
                self.gradient_sums.submit(number, member, job)
            else:
                job.future.set_result(self._missed(number, member, request))

        return await self._edge_round(Kind.EDGE_GRADIENT, submit, member, request)

    def _missed(self, number: int | None, member: str, request: EdgeGradient) -> GradientSum:
        """The answer to a gradient whose round went ahead without it: that round's sum, which the others
        applied, so the device stays one with them; older than that, its own gradient (it diverges)."""
        if self._summed is not None and self._summed[0] == number:
            return GradientSum(request.step, self._summed[1])
        log.warning("fleet %s: %s's gradient of step %d came after its round and the next: it applies it alone "
                    "and no longer equals the others", self.name, member, request.step)
        return GradientSum(request.step, request.tensors)

    async def _edge_round(self, kind: Kind, submit: Callable[[_Job], None], member: str,
                          request: Average | EdgeGradient):
        """Submit ``member``'s edge-sized request to its round and wait for the round's answer.

        One sent again after a reconnect (the reply was lost) gets its round's answer, never a round of
        its own: a second round would reduce it with no one, or with the others' next ones.
        """
        answered = self._answered[kind]
        step, answer = answered.get(member, (None, None))
        if step == request.step and not (answer.done() and answer.exception() is not None):  # a failed round: again
            return await asyncio.shield(answer)
        job = _Job(member, request)
        answered[member] = (request.step, job.future)
        submit(job)
        return await self._wait(job)

    async def _wait(self, job: _Job) -> Any:
        """The round's answer; shielded, so that a handler cancelled while it waits cannot fail the round."""
        self._changed.set()
        return await asyncio.shield(job.future)

    # ------------------------------------------------------------------ rounds

    async def run(self) -> None:
        """Take each round as it becomes ready and run it; wake at the earliest deadline."""
        kinds = ((self.trains, self._train_round), (self.checkpoints, self._checkpoint_round),
                 (self.averages, self._average_round), (self.gradient_sums, self._gradient_round))
        while True:
            self._changed.clear()
            now = time.monotonic()
            ready = next(((queue, run) for queue, run in kinds if queue.ready(now)), None)
            if ready is not None:
                queue, run = ready
                await self._run_round(run, [job for _, job in queue.take(now)])
                continue
            deadlines = [d for queue, _ in kinds if (d := queue.deadline()) is not None]
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, min(deadlines) - now) if deadlines else None)
            except TimeoutError:
                pass

    async def _run_round(self, run: Callable[[list[_Job]], Awaitable[None]], jobs: list[_Job]) -> None:
        """Run one round of ``jobs``; if it fails, each of its members hears why."""
        try:
            await run(jobs)
        except Exception as exc:  # the round failed as a whole: every member hears why
            for job in jobs:
                if self._in_flight.get(job.member) is job:
                    del self._in_flight[job.member]
                if not job.future.done():
                    job.future.set_exception(exc)

    async def _train_round(self, jobs: list[_Job]) -> None:
        items = [job.payload for job in jobs]
        replies = await self.compute.run(self.key, self.top.train_group, [item.request for item in items],
                                         [item.answer for item in items], parallel=self.parallel)
        if self.settings.edge == "shared":  # its gradient round expects exactly this round's members
            self._train_rounds += 1
            self.gradient_sums.expect(self._train_rounds, {job.member for job in jobs}, time.monotonic())
            self._trained_in |= dict.fromkeys((job.member for job in jobs), self._train_rounds)
        for job, item, reply in zip(jobs, items, replies):
            self.members[job.member].applied(item.request.step, item.digest, reply)
            self._in_flight.pop(job.member, None)
            job.future.set_result(reply)

    async def _checkpoint_round(self, jobs: list[_Job]) -> None:
        await self._save("requested")
        for job in jobs:
            job.future.set_result(True)

    async def _average_round(self, jobs: list[_Job]) -> None:
        requests: list[Average] = [job.payload for job in jobs]
        averaged = await self.compute.run(self.key, self._average_weights, [r.weights for r in requests],
                                          [r.examples for r in requests])
        for job, request in zip(jobs, requests):
            job.future.set_result(Averaged(request.step, averaged))

    def _average_weights(self, weights: list[dict[str, np.ndarray]], examples: list[int]) -> dict[str, np.ndarray]:
        """The averaging round's FedAvg (``cloud_backend.fleet_workers`` takes it across workers)."""
        return fedavg(weights, examples)

    async def _gradient_round(self, jobs: list[_Job]) -> None:
        number = jobs[0].payload[0]
        requests: list[EdgeGradient] = [job.payload[1] for job in jobs]
        summed = await self.compute.run(self.key, gradient_sum, [r.tensors for r in requests])
        if _largest(summed) > MAX_GRADIENT:
            raise ProtocolError(f"the round's edge gradients sum beyond ±{MAX_GRADIENT:g}")
        self._summed = (number, summed)
        for job, request in zip(jobs, requests):
            job.future.set_result(GradientSum(request.step, summed))

    # ------------------------------------------------------------------ checkpoints

    async def _save(self, snapshot: str) -> None:
        path = self._snapshot(snapshot)
        if path is None:
            return
        members = {member: steps for member, steps in sorted(self.members.items())}
        await self.compute.run(self.key, self._write, path, members)
        if snapshot == "requested":
            self.saved_step = self.top.step
            self.saved_members = {member: steps.step for member, steps in members.items()}

    def _write(self, path: Path, members: dict[str, CloudSteps]) -> None:
        """The shared top's snapshot plus every member's step and cached reply, in one atomic file."""
        meta, tensors = self.top.snapshot()
        table = []
        for index, (member, steps) in enumerate(members.items()):
            replay = steps.replay
            table.append({"member": member, "step": steps.step,
                          "replay": None if replay is None else {"step": replay.step, "digest": replay.digest}})
            if replay is not None:
                tensors[f"member.{index}.reply"] = torch.frombuffer(bytearray(replay.reply), dtype=torch.uint8)
        meta["fleet"] = {"name": self.name, "members": table}
        write_checkpoint(path, meta, tensors)

    def idle(self) -> bool:
        """No member's request waits in a round: the fleet may be saved and taken out of memory."""
        queues = (self.trains, self.checkpoints, self.averages, self.gradient_sums)
        return not self._in_flight and not any(queue.pending for queue in queues)

    async def save_latest(self) -> bool:
        """Save the fleet as it is (at shutdown); whether a file was written (not without a state dir)."""
        await self._save("latest")
        return self._snapshot("latest") is not None

    @classmethod
    def restore(cls, path: Path, settings: FleetSettings, *, bundle: Bundle, device: torch.device,
                compute: FairCompute, shapes: dict[str, tuple[int, ...]],
                snapshot: Callable[[str], Path | None]) -> "CloudFleet":
        """The fleet as ``_write`` left it (run on the compute thread); ``CheckpointCorrupt`` if not intact."""
        meta, tensors = read_checkpoint(path)
        top = CloudSession.from_snapshot(meta, tensors, bundle=bundle, device=device)
        members = {}
        for index, entry in enumerate(meta["fleet"]["members"]):
            replay = entry["replay"]
            if replay is not None:
                replay = Replay(int(replay["step"]), replay["digest"],
                                tensors[f"member.{index}.reply"].numpy().tobytes())
            members[entry["member"]] = CloudSteps(entry["member"], step=int(entry["step"]), replay=replay)
        fleet = cls(meta["fleet"]["name"], top, settings, compute=compute, shapes=shapes, snapshot=snapshot,
                    members=members)
        fleet.saved_step = top.step
        fleet.saved_members = {member: steps.step for member, steps in members.items()}
        return fleet

