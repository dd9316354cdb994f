"""A fleet's schedules without I/O: who goes into the next cloud step, and when.

Why it exists: the rules that make a fleet's training deterministic (or fast) should be
testable alone, without sockets or clocks, in the manner of ``splitwire.steps``. The
fleet's I/O (``cloud_backend.fleet``) feeds these objects events with the time and asks
them what to do; the time is always passed in.

- ``Barrier`` (the synchronous schedule, and the fleet's checkpoint and averaging rounds):
  each member submits one item; the round goes ahead when every member that is waited for
  has submitted, or ``timeout`` seconds after the round's first submission. The round's
  items come out in the fleet's fixed order (member ids sorted). A member that missed a
  round is absent, not waited for, until it submits again (it rejoins). The first round
  waits until ``quorum`` members have joined, so that a fleet that starts together starts
  with all its devices. A member that leaves (says bye) is no longer waited for.
- ``GradientRounds`` (a fleet's shared edge): train round ``n`` opens gradient round ``n``, which
  expects exactly that round's members and goes ahead when they all sent, or after ``timeout``.
- ``Batcher`` (the asynchronous schedule): items are taken as they arrive; the step goes
  ahead once ``max_rows`` rows are waiting, or ``max_wait`` seconds after the first one
  arrived, with the waiting items in arrival order (at most ``max_rows`` rows, at least one item).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Barrier(Generic[T]):
    """Synchronous rounds of one item per member."""

    timeout: float
    quorum: int = 1
    members: set[str] = field(default_factory=set)
    absent: set[str] = field(default_factory=set)
    pending: dict[str, T] = field(default_factory=dict)
    opened_at: float | None = None  # when this round's first item came
    started: bool = False  # the quorum was reached once

    def join(self, member: str) -> None:
        self.members.add(member)
        self.started = self.started or len(self.members) >= self.quorum

    def leave(self, member: str) -> None:
        """``member`` said bye: it is waited for no more (an item it left pending still counts)."""
        self.members.discard(member)
        self.absent.discard(member)

    def submit(self, member: str, item: T, now: float) -> None:
        if member not in self.members:
            raise ValueError(f"{member!r} has not joined")
        if member in self.pending:
            raise ValueError(f"{member!r} already has an item in this round")
        self.absent.discard(member)
        self.pending[member] = item
        if self.opened_at is None:
            self.opened_at = now

    def waiting_for(self) -> set[str]:
        """The members this round still waits for."""
        return self.members - self.absent - set(self.pending)

    def deadline(self) -> float | None:
        """When the round goes ahead without the missing members (``None``: no round is open, or the
        quorum has not joined yet)."""
        return None if self.opened_at is None or not self.started else self.opened_at + self.timeout

    def ready(self, now: float) -> bool:
        if not self.pending or not self.started:
            return False
        return not self.waiting_for() or now >= self.deadline()

    def take(self, now: float, *, force: bool = False) -> list[tuple[str, T]]:
        """The round's items in member order; the members it went ahead without become absent. ``force``:
        the round goes ahead now, ready here or not (a round across workers, ``cloud_backend.fleet_workers``)."""
        if not force and not self.ready(now):
            raise RuntimeError("the round is not ready")
        self.absent |= self.waiting_for()
        items = sorted(self.pending.items())
        self.pending, self.opened_at = {}, None
        return items


@dataclass
class Batcher(Generic[T]):
    """Asynchronous steps: whatever arrived, up to ``max_rows`` rows, within ``max_wait`` of the first."""

    max_rows: int
    max_wait: float
    pending: list[tuple[str, T, int]] = field(default_factory=list)  # (member, item, rows), in arrival order
    first_at: float | None = None

    def submit(self, member: str, item: T, rows: int, now: float) -> None:
        self.pending.append((member, item, rows))
        if self.first_at is None:
            self.first_at = now

    def deadline(self) -> float | None:
        return None if self.first_at is None else self.first_at + self.max_wait

    def ready(self, now: float) -> bool:
        if not self.pending:
            return False
        return sum(rows for _, _, rows in self.pending) >= self.max_rows or now >= self.deadline()

    def take(self, now: float) -> list[tuple[str, T]]:
        """The items of the next step, in arrival order; those beyond ``max_rows`` wait for the next."""
        if not self.ready(now):
            raise RuntimeError("no step is ready")
        taken, rows = [], 0
        while self.pending and (not taken or rows + self.pending[0][2] <= self.max_rows):
            member, item, size = self.pending.pop(0)
            taken.append((member, item))
            rows += size
        self.first_at = now if self.pending else None
        return taken


@dataclass
class GradientRounds(Generic[T]):
    """A shared edge's gradient rounds: each train round's members send one item (their edge gradient).

    Train round ``n`` opens gradient round ``n`` expecting exactly its members (``expect``); it goes ahead
    once they all sent, or ``timeout`` seconds after it opened, with what came (a round nobody sent to
    closes empty). Rounds stay apart, so a late item can never join another round's sum.
    """

    timeout: float
    rounds: dict[int, tuple[set[str], dict[str, T], float]] = field(default_factory=dict)  # n → expected, items, opened

    def expect(self, number: int, members: set[str], now: float) -> None:
        self.rounds[number] = (set(members), {}, now)

    def is_open(self, number: int) -> bool:
        return number in self.rounds

    def submit(self, number: int, member: str, item: T) -> None:
        expected, items, _ = self.rounds[number]
        if member not in expected or member in items:
            raise ValueError(f"{member!r} has no place in gradient round {number}")
        items[member] = item

    def leave(self, member: str) -> None:
        """``member`` said bye: no open round waits for it."""
        for expected, items, _ in self.rounds.values():
            if member not in items:
                expected.discard(member)

    @property
    def pending(self) -> bool:
        return any(items for _, items, _ in self.rounds.values())

    def deadline(self) -> float | None:
        return min((opened + self.timeout for _, _, opened in self.rounds.values()), default=None)

    def ready(self, now: float) -> bool:
        self._close_expired_empty(now)
        return any(self._done(number, now) for number in self.rounds)

    def take(self, now: float) -> list[tuple[str, T]]:
        """The oldest ready round's items in member order (the round closes)."""
        number = next(n for n in sorted(self.rounds) if self._done(n, now))
        _, items, _ = self.rounds.pop(number)
        return sorted(items.items())

    def _done(self, number: int, now: float) -> bool:
        expected, items, opened = self.rounds[number]
        return bool(items) and (expected <= set(items) or now >= opened + self.timeout)

    def _close_expired_empty(self, now: float) -> None:
        for number in [n for n, (_, items, opened) in self.rounds.items() if not items and now >= opened + self.timeout]:
            del self.rounds[number]
