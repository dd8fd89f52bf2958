"""The part table: every part this gate will see, keyed by (agent_id, camera, seq), until its due point.

Pure logic, no clock and no I/O: callers pass the schedule position (`position`, in the schedule's unit:
monotonic seconds in time mode, counter steps in count mode) and `due_of(capture_ts)`, which turns a capture
time into a due position. The rules:

- A part is rejected at its due point unless a well-formed, in-time accept for it has arrived (`judge`):
  reject, failsafe, an untrusted model, and a verdict the agent itself decided after its deadline all reject.
- A sequence gap seen on a later verdict reveals parts with no verdict: each is due where it would have been
  (capture time interpolated between its neighbours) and is rejected there as `missing` unless its verdict
  still arrives in time. A gap part whose due point has already passed, and a verdict that arrives after its
  own part's due point, are **unguarded**: the part went by with no decision. They are counted, and the
  caller raises the vision-fault alarm; nothing ever fires late.
- Every key is acted on once: QoS 1 redelivery and replays are recognised (bounded memory) and never
  cancel or repeat a reject.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from lineguard.agent.contract import RejectReason, Verdict

Key = tuple[str, str, int]  # agent_id, camera, seq
DueOf = Callable[[float], float]  # capture_ts (Unix s) -> due position
ArrivalKind = Literal["new", "filled", "duplicate", "replay", "late"]

MEMORY_PARTS = 65_536  # keys remembered after their due point, to recognise redelivery and replays
MAX_GAP_PARTS = 256  # a larger gap cannot be placed part by part: its parts count as unguarded


def judge(verdict: Verdict, *, models: tuple[str, ...], deadline_ms: float | None) -> RejectReason | None:
    """Why this verdict rejects its part; None for an accept that may pass."""
    if verdict.verdict == "reject":
        return "reject"
    if verdict.verdict == "failsafe":
        return "failsafe"
    if models and verdict.model not in models and verdict.model.split("@", 1)[0] not in models:
        return "unknown-model"
    if deadline_ms is not None and (verdict.decided_ts - verdict.capture_ts) * 1e3 > deadline_ms:
        return "late"  # the agent decided after its own deadline: not an in-time accept
    return None


@dataclass(slots=True)
class Part:
    """One part between its camera and the reject point."""

    key: Key
    capture_ts: float
    due: float
    camera_frame_id: int = -1
    has_verdict: bool = False
    reason: RejectReason | None = "missing"  # None: an in-time accept, the part passes
    planned: bool = False  # its reject is already with the output (planned on arrival)


@dataclass(frozen=True, slots=True)
class Arrival:
    """What one verdict did to the table."""

    kind: ArrivalKind
    part: Part | None = None  # new or filled
    gap_parts: tuple[Part, ...] = ()  # revealed by a sequence gap, rejected at their due unless filled in time
    unguarded: int = 0  # parts already past their due point when we learnt of them


@dataclass(slots=True)
class _Stream:
    last_seq: int = -1
    last_capture_ts: float = 0.0
    forgotten: int = -1  # keys at or below this seq are no longer remembered


@dataclass(slots=True)
class PartTable:
    """Parts waiting for their due point, and a bounded memory of those gone by."""

    memory: int = MEMORY_PARTS
    max_gap: int = MAX_GAP_PARTS
    pending: dict[Key, Part] = field(default_factory=dict)
    _heap: list[tuple[float, Key]] = field(default_factory=list)
    _done: OrderedDict[Key, bool] = field(default_factory=OrderedDict)  # key -> it had a verdict
    _streams: dict[tuple[str, str], _Stream] = field(default_factory=dict)

    def add(self, verdict: Verdict, reason: RejectReason | None, *, due_of: DueOf, position: float) -> Arrival:
        """Enter one verdict (already judged: `reason`); what it did is in the returned Arrival."""
        key = verdict.key
        part = self.pending.get(key)
        if part is not None:
            if part.has_verdict:
                return Arrival("duplicate")
            self._fill(part, verdict, reason, due_of(verdict.capture_ts), position)
            return Arrival("filled", part)
        if key in self._done:
            return Arrival("duplicate" if self._done[key] else "late")
        stream = self._streams.setdefault(key[:2], _Stream())
        if verdict.seq <= stream.forgotten:
            return Arrival("replay")
        gap_parts: tuple[Part, ...] = ()
        unguarded = 0
        if verdict.seq > stream.last_seq:
            if stream.last_seq >= 0 and verdict.seq > stream.last_seq + 1:
                gap_parts, unguarded = self._gap(stream, verdict, due_of, position)
            stream.last_seq, stream.last_capture_ts = verdict.seq, verdict.capture_ts
        due = due_of(verdict.capture_ts)
        if due <= position:
            self._remember(key, had_verdict=True)
            return Arrival("late", None, gap_parts, unguarded + 1)  # it went by before we knew of it
        part = Part(key, verdict.capture_ts, due, verdict.camera_frame_id, has_verdict=True, reason=reason)
        self._insert(part)
        return Arrival("new", part, gap_parts, unguarded)

    def _fill(self, part: Part, verdict: Verdict, reason: RejectReason | None, due: float, position: float) -> None:
        """A gap part's own verdict arrived before its due point: it now decides, at its real due point."""
        part.has_verdict, part.reason, part.camera_frame_id = True, reason, verdict.camera_frame_id
        part.capture_ts = verdict.capture_ts
        if due > position and due != part.due:
            part.due = due
            heapq.heappush(self._heap, (due, part.key))

    def _gap(self, stream: _Stream, verdict: Verdict, due_of: DueOf, position: float) -> tuple[tuple[Part, ...], int]:
        first, last = stream.last_seq, verdict.seq
        count = last - first - 1
        agent, camera = verdict.agent_id, verdict.camera
        if count > self.max_gap:
            for seq in range(first + 1, last):
                self._remember((agent, camera, seq), had_verdict=False)
            return (), count
        parts, unguarded = [], 0
        step = (verdict.capture_ts - stream.last_capture_ts) / (last - first)
        for seq in range(first + 1, last):
            capture_ts = stream.last_capture_ts + step * (seq - first)
            due = due_of(capture_ts)
            if due <= position:
                unguarded += 1
                self._remember((agent, camera, seq), had_verdict=False)
                continue
            part = Part((agent, camera, seq), capture_ts, due)
            self._insert(part)
            parts.append(part)
        return tuple(parts), unguarded

    def _insert(self, part: Part) -> None:
        self.pending[part.key] = part
        heapq.heappush(self._heap, (part.due, part.key))

    def next_due(self) -> float | None:
        """The earliest due position of a waiting part; None when none waits."""
        while self._heap:
            due, key = self._heap[0]
            part = self.pending.get(key)
            if part is not None and part.due == due:
                return due
            heapq.heappop(self._heap)  # stale: popped already, or moved when its verdict filled a gap
        return None

    def pop_due(self, position: float) -> list[Part]:
        """Parts whose due point has come (due <= position), earliest first; each leaves the table once."""
        out: list[Part] = []
        while (due := self.next_due()) is not None and due <= position:
            _, key = heapq.heappop(self._heap)
            part = self.pending.pop(key)
            self._remember(key, had_verdict=part.has_verdict)
            out.append(part)
        return out

    def _remember(self, key: Key, *, had_verdict: bool) -> None:
        self._done[key] = had_verdict
        while len(self._done) > self.memory:
            (agent, camera, seq), _ = self._done.popitem(last=False)
            stream = self._streams.get((agent, camera))
            if stream is not None:
                stream.forgotten = max(stream.forgotten, seq)
