"""Handshake outputs: hand each part's result to a PLC, which echoes a handshake word back.

At each part's due point (never later than due + pulse.late_limit_ms) the output writes, in one request,
the handshake word (1..65535, a new value per result), the result (1 pass, 2 reject), the reject reason
code and the part id (the part's sequence number); the PLC acts on the new handshake and copies it to
the echo. An echo missing after output.handshake_timeout_ms is a handshake failure: counted, an alarm
(state output-fault), and the next result is still written. The vision state (STATE_CODES) is written
whenever it changes and every second: 1 ok, 2 fault, 3 fault + reject all, 4 fault + line stop.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from abc import abstractmethod
from dataclasses import dataclass

from ..config import ActuatorConfig, FaultAction
from .base import REASON_CODES, STATE_CODES, Output, OutputFault, PartRef

log = logging.getLogger(__name__)

ECHO_POLL_S = 0.002
STATE_EVERY_S = 1.0
RETRY_S = 1.0
PASS, REJECT = 1, 2


@dataclass(frozen=True, slots=True)
class Result:
    handshake: int
    result: int
    reason: int
    part_id: int  # the part's seq, 32 bits


@dataclass(slots=True)
class _Awaiting:
    handshake: int
    part: PartRef
    deadline: float


class HandshakeOutput(Output):
    """Result queue, handshake word and echo check; subclasses write a Result and read the echo."""

    def __init__(self, config: ActuatorConfig) -> None:
        super().__init__()
        self.late_s = config.pulse.late_limit_ms / 1e3
        self.timeout_s = config.output.handshake_timeout_ms / 1e3
        self._queue: list[tuple[float, int, PartRef]] = []  # (due, order, part)
        self._order = itertools.count()
        self._words = itertools.cycle(range(1, 65536))
        self._awaiting: _Awaiting | None = None
        self._state = STATE_CODES[None]
        self._next_state = 0.0
        self._retry_at = 0.0
        self._link_problem = ""
        self._echo_problem = ""

    @abstractmethod
    def _write_result(self, result: Result) -> None:
        """One result, written at once; OutputFault when the PLC does not take it."""

    @abstractmethod
    def _read_echo(self) -> int:
        """The PLC's echo of the handshake word."""

    @abstractmethod
    def _write_state(self, code: int) -> None:
        """The vision state word."""

    def reject(self, part: PartRef, now: float) -> None:
        heapq.heappush(self._queue, (part.due, next(self._order), part))

    def accept(self, part: PartRef, now: float) -> None:
        heapq.heappush(self._queue, (part.due, next(self._order), part))

    def set_fault(self, action: FaultAction | None, now: float) -> None:
        self._state = STATE_CODES[action]
        self._next_state = now

    def next_event(self, now: float) -> float | None:
        times = [self._next_state]
        if self._queue:
            times.append(self._queue[0][0])
        if self._awaiting is not None:
            times.append(now + ECHO_POLL_S)
        return max(min(times), self._retry_at)

    def poll(self, now: float) -> None:
        if now < self._retry_at:
            self._drop_missed(now)
            return
        try:
            self._check_echo(now)
            while self._queue and self._queue[0][0] <= now:
                _, _, part = heapq.heappop(self._queue)
                if now > part.due + self.late_s:
                    self._event("late", (part.key,), part.due, now, "result not written by the due point")
                    continue
                self._send(part, now)
            if now >= self._next_state:
                self._write_state(self._state)
                self._next_state = now + STATE_EVERY_S
        except OutputFault as error:
            if str(error) != self._link_problem:
                log.error("%s output: %s; retrying every %.0f s", self.kind, error, RETRY_S)
            self._link_problem = str(error)
            self._retry_at = now + RETRY_S
            self._drop_missed(now)
        else:
            self._link_problem = ""
        self.problem = self._link_problem or self._echo_problem

    def _send(self, part: PartRef, now: float) -> None:
        if self._awaiting is not None and now > self._awaiting.deadline:
            self._handshake_failed(now)
        word = next(self._words)
        self._write_result(
            Result(word, PASS if part.reason is None else REJECT, REASON_CODES[part.reason], part.key[2] & 0xFFFFFFFF)
        )
        self._event("pulse" if part.reason is not None else "result", (part.key,), part.due, now)
        self._awaiting = _Awaiting(word, part, now + self.timeout_s)

    def _check_echo(self, now: float) -> None:
        if self._awaiting is None:
            return
        if self._read_echo() == self._awaiting.handshake:
            self._awaiting = None
            self._echo_problem = ""
        elif now > self._awaiting.deadline:
            self._handshake_failed(now)

    def _handshake_failed(self, now: float) -> None:
        assert self._awaiting is not None
        waited = self.timeout_s * 1e3
        self._echo_problem = f"the PLC did not echo handshake {self._awaiting.handshake} within {waited:.0f} ms"
        self._event("handshake-failed", (self._awaiting.part.key,), self._awaiting.part.due, now, self._echo_problem)
        self._awaiting = None

    def _drop_missed(self, now: float) -> None:
        while self._queue and now > self._queue[0][0] + self.late_s:
            _, _, part = heapq.heappop(self._queue)
            self._event("late", (part.key,), part.due, now, f"output fault: {self._link_problem}")
