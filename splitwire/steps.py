"""The session's rules without I/O: step order, the replay cache, rewind and resume.

Why it exists: edge and cloud must agree on which training step comes next, what a resent
step is answered with, and where the two halves meet again after a dropped connection or a
restart. Those rules live here once, as two small state objects that take events and
return decisions, in the manner of websockets' protocol objects: ``cloud_backend`` and
``edge_runtime.client`` are the I/O around them, and tests drive them without sockets.

The rules:

- the cloud applies training step ``n`` only right after ``n - 1``; a resend of the step it
  applied last is answered from its replay cache (the exact reply frame), never applied
  twice; any other step is ``StepOrderError``;
- a checkpoint is of the step the cloud is at;
- an edge that resumes from step ``r`` meets the cloud where it is when the cloud is at ``r``,
  or at ``r + 1`` with that step's reply cached (the edge resends it); otherwise the cloud
  must go back to a snapshot taken at ``r``;
- after a reconnect, a request is resent only if the cloud is at one of the steps that make
  the resend exact; anywhere else the edge must go back to its own checkpoint of the
  cloud's step (``SessionRewound``).

The label-private (U-shaped) split makes a step two round trips: ``TRAIN`` n → ``TOP`` (the
cloud's forward ran; it holds the step as *pending* with its graph), then ``TOP_GRADIENT`` n →
``GRADIENT`` (the step is applied). Its rules:

- a ``TRAIN`` n is answered from the ``TOP`` already sent when n is pending with the same
  request, or when n is the step applied last (its replay keeps both replies); otherwise it
  begins step n (which must be the next), replacing a pending one: the cloud's dropout
  generator only moves on when a step is applied, so the forward is computed afresh exactly;
- a ``TOP_GRADIENT`` n applies pending step n, or is answered from the replay cache when n was
  applied last; with nothing pending it is ``StepOrderError``;
- a ``TOP_GRADIENT`` the cloud refuses (a gradient that would not be finite) ends the pending step:
  it is begun again by the next ``TRAIN``;
- a pending step is never checkpointed, so after a reconnect in the middle of a step the edge
  resends the whole step from its ``TRAIN`` (a cloud that restarted has lost the pending step; one
  that did not answers the ``TRAIN`` from its cache), which is exact either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitwire.errors import SessionRewound, StepOrderError


@dataclass(frozen=True)
class Replay:
    """The one-entry replay cache: the last step's request digest and the exact reply frame (label-private:
    also the step's first reply, ``TOP``)."""

    step: int
    digest: str
    reply: bytes
    top: bytes | None = None


@dataclass(frozen=True)
class Pending:
    """Label-private: a step between its two round trips: its ``TRAIN``'s digest and the ``TOP`` sent."""

    step: int
    digest: str
    top: bytes


class CloudSteps:
    """The cloud's side of one session: the last applied step and its cached reply."""

    def __init__(self, session_id: str, *, step: int = 0, replay: Replay | None = None) -> None:
        self.session_id = session_id
        self.step = step
        self.replay = replay
        self.pending: Pending | None = None

    def cached_reply(self, step: int) -> Replay | None:
        """For a TRAIN of ``step``: the cached reply of a resend, ``None`` for the next step to apply;
        ``StepOrderError`` for anything else."""
        if self.replay is not None and step == self.replay.step == self.step:
            return self.replay
        self.check_next(step)
        return None

    def check_next(self, step: int) -> None:
        if step != self.step + 1:
            raise StepOrderError(f"session {self.session_id!r} is at step {self.step}; "
                                 f"expected step {self.step + 1}, got {step}")

    def applied(self, step: int, digest: str, reply: bytes, top: bytes | None = None) -> None:
        """Step ``step`` was applied and answered with ``reply`` (label-private: its first reply was ``top``)."""
        self.check_next(step)
        self.step = step
        self.replay = Replay(step, digest, reply, top)

    def cached_top(self, step: int, digest: str) -> bytes | None:
        """For a label-private TRAIN of ``step``: the ``TOP`` already sent for it, or ``None`` for the
        next step to begin; ``StepOrderError`` for anything else."""
        if self.replay is not None and self.replay.top is not None and step == self.replay.step == self.step:
            return self.replay.top
        if self.pending is not None and (self.pending.step, self.pending.digest) == (step, digest):
            return self.pending.top
        self.check_next(step)
        return None

    def began(self, step: int, digest: str, top: bytes) -> None:
        """Label-private step ``step``'s forward ran and was answered with ``top``; it waits for its gradient."""
        self.check_next(step)
        self.pending = Pending(step, digest, top)

    def take_pending(self, step: int) -> Pending:
        """The pending step ``step``, no longer pending: it is applied now, or refused and begun again."""
        pending = self.pending
        if pending is None or pending.step != step:
            raise StepOrderError(f"session {self.session_id!r} holds no forward of step {step}")
        self.pending = None
        return pending

    def cached_gradient(self, step: int) -> Replay | None:
        """For a TOP_GRADIENT of ``step``: the cached reply of a resend, ``None`` for the pending step;
        ``StepOrderError`` for anything else."""
        if self.replay is not None and step == self.replay.step == self.step:
            return self.replay
        if self.pending is None or self.pending.step != step:
            raise StepOrderError(f"session {self.session_id!r} is at step {self.step} with no forward of step {step} "
                                 f"waiting for its gradient: send TRAIN {step} first")
        return None

    def check_checkpoint(self, step: int) -> None:
        if step != self.step:
            raise StepOrderError(f"checkpoint of step {step} asked, but session {self.session_id!r} is at step "
                                 f"{self.step}")

    def meets(self, resume_from: int) -> bool:
        """Whether an edge resuming from ``resume_from`` can go on with the cloud as it is."""
        replayable = self.replay is not None and self.replay.step == self.step == resume_from + 1
        return self.step == resume_from or replayable


class EdgeSteps:
    """The edge's side of one session: the last step both halves applied, and where the cloud
    said it was when the connection (re)opened."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.step = 0
        self.resume_step = 0

    def welcomed(self, resume_step: int) -> None:
        self.resume_step = resume_step

    def check_resend(self, *, edge_step: int, accept: tuple[int, ...]) -> None:
        """After a reconnect: ``SessionRewound`` unless the cloud is at a step in ``accept``."""
        if self.resume_step not in accept:
            self.step = self.resume_step
            raise SessionRewound(f"the cloud came back at step {self.resume_step} of session {self.session_id!r}; "
                                 f"the edge is at step {edge_step}", step=self.resume_step)

    def train_accept(self, step: int) -> tuple[int, ...]:
        """Where the cloud may be for a resend of TRAIN ``step`` to be exact: before it, or just after it."""
        return (step - 1, step)

    def applied(self, step: int) -> None:
        self.step = step
