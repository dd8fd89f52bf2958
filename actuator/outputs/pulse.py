"""Pulse outputs (a coil on a remote I/O block, a GPIO line): one pulse per rejected part, timed by poll().

Signals: `reject` (pulsed), `ready` (held on while healthy: off = vision fault) and `run` (a run permit, held
on unless the fault action is line-stop). Wire them so that de-energised means reject or fault: a dead
actuator, a cut wire or a lost I/O block then stops or diverts the line instead of passing parts.

Timing rules: a pulse starts at its part's due point and lasts pulse.width_ms; pulses that overlap, or
that would leave less than pulse.min_off_ms off between them, merge into one; a pulse that cannot start
by due + pulse.late_limit_ms is not fired (an event `late`), never fired late.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Literal

from ..config import FaultAction, PulseConfig
from ..parts import Key
from .base import Output, OutputFault, PartRef

log = logging.getLogger(__name__)

Signal = Literal["reject", "ready", "run"]
KEEPALIVE_S = 1.0  # the held signals are rewritten this often (an I/O block's communication watchdog sees us)
RETRY_S = 1.0


@dataclass(slots=True)
class _Pulse:
    start: float
    end: float
    parts: list[tuple[Key, float]] = field(default_factory=list)  # (part, due)


class PulseOutput(Output):
    """Pulse timing, merging and the held signals; subclasses only drive a signal on or off."""

    def __init__(self, pulse: PulseConfig, *, signals: tuple[Signal, ...]) -> None:
        super().__init__()
        self.width_s, self.min_off_s, self.late_s = (
            pulse.width_ms / 1e3,
            pulse.min_off_ms / 1e3,
            pulse.late_limit_ms / 1e3,
        )
        self.signals = signals
        self._pulses: list[_Pulse] = []  # planned or in progress, by start
        self._on = False
        self._last_off = float("-inf")
        self._fault: FaultAction | None = None
        self._next_keepalive = 0.0
        self._retry_at = 0.0

    @abstractmethod
    def _drive(self, signal: Signal, on: bool) -> None:
        """Set one signal; OutputFault when the device does not take it."""

    # -- planning --------------------------------------------------------------------------------------------

    def reject(self, part: PartRef, now: float) -> None:
        if self._fault == "reject-all" and part.due <= now + self.late_s:
            return  # due now, while the reject output is held on: the hold rejects it
        start = max(part.due, now, self._last_off + self.min_off_s)
        if start > part.due + self.late_s:
            self._event("late", (part.key,), part.due, now, "the output could not be on by the part's due point")
            return
        self._pulses.append(_Pulse(start, max(start, part.due) + self.width_s, [(part.key, part.due)]))
        self._pulses.sort(key=lambda pulse: pulse.start)
        merged = [self._pulses[0]]
        for pulse in self._pulses[1:]:
            last = merged[-1]
            if pulse.start < last.end + self.min_off_s:
                last.end = max(last.end, pulse.end)
                last.parts += pulse.parts
            else:
                merged.append(pulse)
        self._pulses = merged

    def accept(self, part: PartRef, now: float) -> None:
        """A passing part needs nothing from a pulse output."""

    # -- timed work ------------------------------------------------------------------------------------------

    def next_event(self, now: float) -> float | None:
        times = [self._next_keepalive]
        if self._pulses:
            times.append(self._pulses[0].end if self._on else self._pulses[0].start)
        if self.problem:
            times.append(self._retry_at)
        return min(times)

    def poll(self, now: float) -> None:
        if self.problem and now < self._retry_at:
            self._drop_missed(now)
            return
        try:
            if self._pulses and not self._on and now >= self._pulses[0].start:
                self._start(self._pulses[0], now)
            if self._pulses and self._on and now >= self._pulses[0].end:
                self._pulses.pop(0)
                self._on, self._last_off = False, now
                if self._fault != "reject-all":
                    self._drive("reject", False)
            if now >= self._next_keepalive:
                self._write_held()
                self._next_keepalive = now + KEEPALIVE_S
        except OutputFault as error:
            self._fail(str(error), now)
        else:
            self.problem = ""

    def _start(self, pulse: _Pulse, now: float) -> None:
        live = [(key, due) for key, due in pulse.parts if now <= due + self.late_s]
        late = [(key, due) for key, due in pulse.parts if now > due + self.late_s]
        if late and self._fault != "reject-all":  # under reject-all the held output rejected them
            self._event("late", tuple(key for key, _ in late), min(due for _, due in late), now, "the loop woke late")
        if not live:
            self._pulses.pop(0)
            return
        if self._fault != "reject-all":
            self._drive("reject", True)
        self._on = True
        due = min(due for _, due in live)
        self._event("pulse", tuple(key for key, _ in live), due, now)

    def _drop_missed(self, now: float) -> None:
        """While the device is unreachable, pulses whose chance has passed are reported late, not kept."""
        while self._pulses and not self._on and now > self._pulses[0].start + self.late_s:
            pulse = self._pulses.pop(0)
            keys = tuple(key for key, _ in pulse.parts)
            self._event("late", keys, min(due for _, due in pulse.parts), now, f"output fault: {self.problem}")

    def _fail(self, problem: str, now: float) -> None:
        if problem != self.problem:
            log.error("%s output: %s; retrying every %.0f s", self.kind, problem, RETRY_S)
        self.problem = problem
        self._retry_at = now + RETRY_S
        self._on = False  # unknown: drive it again from scratch once the device answers
        self._last_off = now
        self._next_keepalive = 0.0
        self._drop_missed(now)

    # -- held signals ----------------------------------------------------------------------------------------

    def set_fault(self, action: FaultAction | None, now: float) -> None:
        if action == self._fault:
            return
        self._fault = action
        try:
            self._write_held()
            if action == "reject-all":
                self._drive("reject", True)
            elif not self._on:
                self._drive("reject", False)
        except OutputFault as error:
            self._fail(str(error), now)

    def _write_held(self) -> None:
        if "ready" in self.signals:
            self._drive("ready", self._fault is None)
        if "run" in self.signals:
            self._drive("run", self._fault != "line-stop")
        if self._fault == "reject-all":
            self._drive("reject", True)

    def close(self) -> None:
        """All signals off: reject off, ready off (fault), run off (stop)."""
        for signal in ("reject", *self.signals):
            try:
                self._drive(signal, False)  # type: ignore[arg-type]
            except OutputFault as error:
                log.warning("%s output: could not turn %s off at close: %s", self.kind, signal, error)
