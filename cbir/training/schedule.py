"""The learning-rate schedule: linear warm-up, then cosine decay to 0; fitted to a time budget by
ending the decay earlier, without a jump in the LR."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay reaching 0 after `total` steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


FIT_SLACK = 0.05  # a fitted schedule leaves this share of each epoch's time for noise


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up, then cosine decay reaching 0 at the end of epoch `epochs`.

    Unfitted (`anchor` None) it is exactly `lr_at`. Fitted to a time budget, the decay ends
    earlier without a jump in the LR: from step `anchor` on, the cosine's remaining progress
    (from `progress` there, to 1) is spread over the steps left.
    """

    base: float
    steps: int  # per epoch
    warmup: int  # steps
    epochs: int
    anchor: int | None = None
    progress: float = 0.0

    @property
    def total(self) -> int:
        return self.epochs * self.steps

    def lr(self, step: int) -> float:
        if self.anchor is None or step < self.warmup:
            return lr_at(step, self.total, self.warmup, self.base)
        return self.base * 0.5 * (1.0 + math.cos(math.pi * self._progress(step)))

    def _progress(self, step: int) -> float:
        """Cosine progress at `step` (>= warm-up): 0 where the decay starts, 1 at its end."""
        if self.anchor is None:
            return (step - self.warmup) / max(1, self.total - self.warmup)
        return self.progress + (1.0 - self.progress) * (step - self.anchor) / max(
            1, self.total - self.anchor
        )

    def fewest_epochs(self, done: int) -> int:
        """The shortest schedule still possible after `done` epochs: one that ends at least one
        step after the warm-up."""
        return max(done * self.steps, self.warmup) // self.steps + 1

    def fitted(self, done: int, epochs: int) -> Schedule:
        """This schedule, continued from the end of epoch `done`, ending after `epochs`."""
        if epochs < self.fewest_epochs(done):
            raise ValueError(f"cannot end after epoch {epochs} once {done} are done")
        at = max(done * self.steps, self.warmup)
        return replace(self, epochs=epochs, anchor=at, progress=self._progress(at))

    def state(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "anchor": self.anchor, "progress": self.progress}


def fit_epochs(
    schedule: Schedule, done: int, elapsed: float, epoch_seconds: float, budget: float
) -> int:
    """The epochs the schedule should span so that it ends within `budget` seconds of the run:
    its length if that fits at `epoch_seconds` an epoch, else as many as fit (leaving FIT_SLACK
    for noise), but never fewer than `Schedule.fewest_epochs`. Only ever shortens."""
    left = schedule.epochs - done
    if budget <= 0 or left <= 0 or elapsed + left * epoch_seconds <= budget:
        return schedule.epochs
    fits = done + int(max(0.0, budget - elapsed) / (epoch_seconds * (1.0 + FIT_SLACK)))
    return min(schedule.epochs, max(schedule.fewest_epochs(done), fits))
