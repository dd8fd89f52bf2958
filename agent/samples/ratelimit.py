"""A per-minute budget for things an agent keeps or answers (samples per camera, refused labels)."""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimit:
    """A token bucket: at most `per_minute` events in any minute, refilled evenly, bursts up to a minute's worth."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            msg = f"per_minute must be >= 1, got {per_minute}"
            raise ValueError(msg)
        self.capacity, self._clock = float(per_minute), clock
        self._tokens, self._last = float(per_minute), clock()

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.capacity / 60.0)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
