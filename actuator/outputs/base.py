"""The one interface every output back end has, and what an output reports back.

The service calls `reject(part)` as soon as a part's reject is certain (possibly before its due point) and
`accept(part)` at the due point of a part that passes; `poll(now)` does the timed work (pulse edges,
handshake checks) and `next_event()` says when it is needed next. `set_fault(action)` applies or clears
the vision-fault action. An output never raises out of these calls for a device problem: it sets `problem`
(the service raises the alarm), records an event, and retries on the next poll.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

from lineguard.agent.contract import RejectReason

from ..config import FaultAction
from ..parts import Key

EventKind = Literal["pulse", "late", "result", "handshake-failed"]
STATE_CODES: dict[FaultAction | None, int] = {None: 1, "fault-output": 2, "reject-all": 3, "line-stop": 4}
REASON_CODES: dict[RejectReason | None, int] = {
    None: 0,
    "reject": 1,
    "failsafe": 2,
    "missing": 3,
    "late": 4,
    "unknown-model": 5,
    "sequence-gap": 6,
    "vision-fault": 7,
}


class OutputUnavailable(Exception):
    """The output cannot exist as configured (no such GPIO chip, library missing): the message names the key."""


class OutputFault(Exception):
    """One write or read to the device failed (connection lost, exception response, timeout)."""


@dataclass(frozen=True, slots=True)
class PartRef:
    """A part as an output sees it: which, why rejected (None: passes), and when due (monotonic s)."""

    key: Key
    reason: RejectReason | None
    due: float


@dataclass(frozen=True, slots=True)
class OutputEvent:
    """Something the output did or could not do: a pulse (its parts, due point, actual start), a late one, ..."""

    kind: EventKind
    parts: tuple[Key, ...]
    due: float
    at: float
    detail: str = ""


class Output(ABC):
    """A reject output. Subclasses: PulseOutput (coil, GPIO line) and HandshakeOutput (PLC registers, OPC UA)."""

    kind: ClassVar[str]

    def __init__(self) -> None:
        self.problem = ""  # "" while the device answers; else what is wrong, for the alarm and the status
        self._events: list[OutputEvent] = []

    @abstractmethod
    def reject(self, part: PartRef, now: float) -> None:
        """Reject this part at part.due (now or later); a reject is never withdrawn."""

    @abstractmethod
    def accept(self, part: PartRef, now: float) -> None:
        """The part passes (called at its due point)."""

    @abstractmethod
    def poll(self, now: float) -> None:
        """Do what is due by `now`."""

    @abstractmethod
    def next_event(self, now: float) -> float | None:
        """When poll() is needed next (monotonic s); None: only after the next reject, accept or fault."""

    @abstractmethod
    def set_fault(self, action: FaultAction | None, now: float) -> None:
        """Apply a vision-fault action (None: healthy again)."""

    @abstractmethod
    def close(self) -> None:
        """De-energise everything and let go of the device."""

    def _event(self, kind: EventKind, parts: tuple[Key, ...], due: float, at: float, detail: str = "") -> None:
        self._events.append(OutputEvent(kind, parts, due, at, detail))

    def drain_events(self) -> list[OutputEvent]:
        events, self._events = self._events, []
        return events
