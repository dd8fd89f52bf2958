"""Where a part is due: time mode (capture time + reject_delay_ms) or count mode (a line counter).

A schedule has a *position* that only grows: monotonic seconds (time mode) or counter steps since start
(count mode). `due_of(capture_ts)` gives a part's due position; `time_of(due)` the monotonic time it is
(or was) reached, for waking up and for the pulse timing error.

Time mode compares the agent's capture_ts (its wall clock) with this host's wall clock: the same host, or
both NTP-synchronised (an offset of e ms moves every pulse by e ms). Each conversion reads both clocks
now, so an NTP step moves the due points of parts still on the belt with it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

COUNTER_BITS = 32
HISTORY = 4096  # counter samples kept (8 s at a 2 ms poll) to find the count at a frame's capture time


def wall_minus_monotonic() -> float:
    return time.time() - time.monotonic()


@dataclass(slots=True)
class TimeSchedule:
    """due = capture_ts + delay, as this host's monotonic time."""

    delay_s: float
    offset: Callable[[], float] = wall_minus_monotonic  # wall clock minus monotonic clock, now

    def due_of(self, capture_ts: float) -> float:
        return capture_ts - self.offset() + self.delay_s

    def position(self, now: float) -> float:
        return now

    def time_of(self, due: float) -> float | None:
        return due

    def wake_at(self, due: float, now: float) -> float:
        return due


@dataclass(slots=True)
class CountSchedule:
    """due = the counter's value at capture + distance; counts come from `observe` (a 32-bit counter that wraps)."""

    distance: int
    poll_s: float
    offset: Callable[[], float] = wall_minus_monotonic
    _history: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=HISTORY))  # (monotonic, count)
    _raw: int | None = None
    _count: float = 0.0

    def observe(self, now: float, raw: int) -> None:
        """One counter reading at monotonic time `now`; wraps of the 32-bit counter are unrolled."""
        if self._raw is not None:
            self._count += (raw - self._raw) % (1 << COUNTER_BITS)
        self._raw = raw
        self._history.append((now, self._count))

    def position(self, now: float) -> float:
        return self._count

    def due_of(self, capture_ts: float) -> float:
        return self._count_at(capture_ts - self.offset()) + self.distance

    def _count_at(self, t: float) -> float:
        """The count at monotonic time t, interpolated between readings (the newest, for a t after it)."""
        if not self._history:
            return 0.0
        if t >= self._history[-1][0]:
            return self._history[-1][1]
        previous = self._history[0]
        if t <= previous[0]:
            return previous[1]
        for sample in self._history:
            if sample[0] >= t:
                span = sample[0] - previous[0]
                return previous[1] + (sample[1] - previous[1]) * ((t - previous[0]) / span if span > 0 else 1.0)
            previous = sample
        return previous[1]

    def time_of(self, due: float) -> float | None:
        """When the counter passed `due` (interpolated), None while it has not."""
        if not self._history or self._history[-1][1] < due:
            return None
        previous = self._history[-1]
        for sample in reversed(self._history):
            if sample[1] < due:
                span = previous[1] - sample[1]
                return sample[0] + (previous[0] - sample[0]) * ((due - sample[1]) / span if span > 0 else 1.0)
            previous = sample
        return previous[0]

    def wake_at(self, due: float, now: float) -> float:
        return now + self.poll_s


Schedule = TimeSchedule | CountSchedule
