"""The learning-rate schedule, shared so that edge and cloud step with the same rate.

Why it exists: both halves run their own AdamW; the schedule is agreed in the handshake
and evaluated independently on each side from the step number alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from splitwire.errors import UsageError

SCHEDULES = ("constant", "linear")
MAX_LR = 1.0  # far above any fine-tuning rate; beyond it AdamW's steps are no longer small
MAX_STEPS = 10**9


@dataclass(frozen=True)
class Schedule:
    """``constant``: ``lr`` after ``warmup_steps`` of linear warm-up. ``linear``: then linear decay to 0 at ``total_steps``."""

    lr: float
    kind: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise UsageError(f"schedule must be one of {', '.join(SCHEDULES)}, got {str(self.kind)[:32]!r}")
        if not isinstance(self.lr, float) or not (math.isfinite(self.lr) and 0 < self.lr <= MAX_LR):
            raise UsageError(f"lr must be a number in (0, {MAX_LR:g}], got {str(self.lr)[:32]!r}")
        for name in ("warmup_steps", "total_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_STEPS:
                raise UsageError(f"{name} must be a whole number in 0..{MAX_STEPS}, got {str(value)[:32]!r}")
        if self.kind == "linear" and self.total_steps <= self.warmup_steps:
            raise UsageError("a linear schedule needs total_steps > warmup_steps")

    def rate(self, step: int) -> float:
        """Learning rate for 1-based training step ``step``."""
        if step <= self.warmup_steps:
            return self.lr * step / max(1, self.warmup_steps) if self.warmup_steps else self.lr
        if self.kind == "constant":
            return self.lr
        remaining = max(0, self.total_steps - step + 1)
        return self.lr * remaining / (self.total_steps - self.warmup_steps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Schedule":
        """From ``to_dict``'s output, as received: the values must already have their types (no "inf"
        strings, no booleans, no floats for step counts)."""
        if set(data) != {"lr", "kind", "warmup_steps", "total_steps"}:
            raise UsageError("a schedule has exactly lr, kind, warmup_steps and total_steps")
        lr = data["lr"]
        return cls(float(lr) if type(lr) is int else lr, data["kind"], data["warmup_steps"], data["total_steps"])
