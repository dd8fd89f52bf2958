"""Every input the dashboard drops is counted and logged, at most one line per kind every few seconds."""

from __future__ import annotations

import logging
import threading
import time

from lineguard.agent.contract import clip

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
MAX_DETAIL_CHARS = 200  # anything echoed from input into the log is cut to this


class Drops:
    """Counts of dropped inputs by kind (`malformed-verdict`, `store-full`, `slow-browser`...), logged rate-limited.

    `drop(kind, detail)` is cheap and thread-safe; the first drop of a kind in a quiet period is logged at once
    with its detail, later ones are summed into one line per LOG_EVERY_S.
    """

    def __init__(self, *, log_every_s: float = LOG_EVERY_S) -> None:
        if log_every_s <= 0:
            msg = f"log_every_s must be > 0, got {log_every_s}"
            raise ValueError(msg)
        self._lock = threading.Lock()
        self._totals: dict[str, int] = {}
        self._unlogged: dict[str, int] = {}
        self._next_log: dict[str, float] = {}
        self._log_every_s = log_every_s

    def drop(self, kind: str, detail: str = "", *, count: int = 1) -> None:
        now = time.monotonic()
        with self._lock:
            self._totals[kind] = self._totals.get(kind, 0) + count
            self._unlogged[kind] = self._unlogged.get(kind, 0) + count
            if now < self._next_log.get(kind, 0.0):
                return
            self._next_log[kind] = now + self._log_every_s
            dropped, self._unlogged[kind] = self._unlogged[kind], 0
        log.warning(
            "dropped %d %s input(s) (%d in all): %s", dropped, kind, self.total(kind), clip(detail, MAX_DETAIL_CHARS)
        )

    def total(self, kind: str) -> int:
        with self._lock:
            return self._totals.get(kind, 0)

    def totals(self) -> dict[str, int]:
        with self._lock:
            return dict(self._totals)
