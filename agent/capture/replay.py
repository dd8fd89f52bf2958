"""Pacing for replayed sources (image folders, video files): one frame per period on a monotonic schedule."""

from __future__ import annotations

import time


class ReplayClock:
    """Paces a replay at `fps` on a monotonic schedule; when the reader falls behind it re-anchors, never bursts."""

    def __init__(self, fps: float) -> None:
        if fps <= 0:
            msg = f"replay rate must be > 0 frames per second, got {fps}"
            raise ValueError(msg)
        self._period_ns = round(1e9 / fps)
        self._due_ns: int | None = None  # the first frame is due at once

    def wait(self, timeout_s: float) -> bool:
        """Sleep until the next frame is due, at most `timeout_s`; True when it is due."""
        now_ns = time.monotonic_ns()
        if self._due_ns is None:
            self._due_ns = now_ns
        deadline_ns = now_ns + round(max(timeout_s, 0.0) * 1e9)
        while now_ns < self._due_ns:
            if now_ns >= deadline_ns:
                return False
            time.sleep((min(self._due_ns, deadline_ns) - now_ns) / 1e9)
            now_ns = time.monotonic_ns()
        return True

    def advance(self) -> None:
        """The due frame was delivered: the next is due one period later, or one period from now after a stall."""
        now_ns = time.monotonic_ns()
        due_ns = (now_ns if self._due_ns is None else self._due_ns) + self._period_ns
        self._due_ns = now_ns + self._period_ns if due_ns < now_ns - self._period_ns else due_ns
