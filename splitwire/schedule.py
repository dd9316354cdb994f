"""The learning-rate schedule, shared so that edge and cloud step with the same rate.

Why it exists: both halves run their own AdamW; the schedule is agreed in the handshake
and evaluated independently on each side from the step number alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class Schedule:
    """``constant``: ``lr`` after ``warmup_steps`` of linear warm-up. ``linear``: then linear decay to 0 at ``total_steps``."""

    lr: float
    kind: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.total_steps < 0:
            raise ValueError(f"bad schedule {self}")
        if self.kind == "linear" and self.total_steps <= self.warmup_steps:
            raise ValueError("a linear schedule needs total_steps > warmup_steps")

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
        return cls(float(data["lr"]), str(data["kind"]), int(data["warmup_steps"]), int(data["total_steps"]))
