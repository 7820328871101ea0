"""Progress of long loops (warm-up training, gradients): examples/s and ETA through a callback.

The core never prints: a step hands a callback (`print`, a logger, Dagster's `context.log.info`) that
receives `ProgressEvent`s; `str(event)` is the line a person reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["ProgressCallback", "ProgressEvent", "ProgressMeter", "format_seconds", "tenths"]


def format_seconds(seconds: float) -> str:
    """1h02m, 3m05s, 12.3s."""
    if seconds != seconds or seconds == float("inf"):  # NaN or unknown
        return "?"
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"


@dataclass(frozen=True)
class ProgressEvent:
    """`done` of `total` units of `phase` after `elapsed_s` seconds, plus named numbers (e.g. loss)."""

    phase: str
    done: int
    total: int
    elapsed_s: float
    unit: str = "examples"
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Units per second so far."""
        return self.done / self.elapsed_s if self.elapsed_s > 0 else float("nan")

    @property
    def eta_s(self) -> float:
        """Seconds left at the rate so far."""
        return (self.total - self.done) / self.rate if self.rate > 0 else float("nan")

    def __str__(self) -> str:
        extra = "".join(f", {k} {v:.4g}" for k, v in self.extra.items())
        return (f"{self.phase}: {self.done}/{self.total} {self.unit} ({self.rate:.1f} {self.unit}/s, "
                f"elapsed {format_seconds(self.elapsed_s)}, ETA {format_seconds(self.eta_s)}){extra}")


ProgressCallback = Callable[[ProgressEvent], None]


def tenths(total: int) -> int:
    """The `ProgressMeter.step` that reports about ten times over `total` units."""
    return max(1, -(-total // 10))


class ProgressMeter:
    """Counts units and reports every `every` updates that advanced at least `step` units since the last report
    (and at `finish`) to an optional callback. `step` keeps a pass whose batches shrink (a byte cap on reads, a
    batch halved after running out of memory) at about `total / step` reports: `tenths(total)` for ten."""

    def __init__(self, phase: str, total: int, callback: ProgressCallback | None, *, unit: str = "examples",
                 every: int = 10, step: int = 0) -> None:
        self.phase, self.total, self.callback, self.unit, self.every = phase, total, callback, unit, max(1, every)
        self.step = step
        self.done = 0
        self.updates = 0
        self.reported = -1  # `done` at the last report
        self.start = time.perf_counter()

    def event(self, **extra: float) -> ProgressEvent:
        return ProgressEvent(self.phase, self.done, self.total, time.perf_counter() - self.start, self.unit, extra)

    def update(self, n: int, **extra: float) -> None:
        """Add `n` units; report if this is every `every`-th update and `step` units on from the last report."""
        self.done += n
        self.updates += 1
        if self.updates % self.every == 0 and self.done - max(self.reported, 0) >= self.step:
            self._report(self.event(**extra))

    def report(self, **extra: float) -> ProgressEvent:
        """Report the current state now (e.g. at the end of an epoch) and return it."""
        event = self.event(**extra)
        self._report(event)
        return event

    def finish(self, **extra: float) -> ProgressEvent:
        """Report the final state (unless just reported without new numbers) and return it."""
        event = self.event(**extra)
        if self.done != self.reported or extra:
            self._report(event)
        return event

    def _report(self, event: ProgressEvent) -> None:
        self.reported = event.done
        if self.callback is not None:
            self.callback(event)
