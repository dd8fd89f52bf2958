"""Which verdicts the broker holds, per camera: what decision tells capture, and how it spots a resent record.

A verdict is `handed` to the MQTT publisher, then `settled` when the broker's PUBACK arrives (QoS 0: when
paho took it). Each settled seq goes back to capture at once (Published), from the publisher's own thread,
so a decision killed right after the broker acknowledged a verdict has almost surely told capture too (the
window left is the broker's round trip: a fraction of a millisecond). Capture then forgets the record; what
it still holds when decision restarts, it sends again, and a record this process already answered is a
duplicate (the newest settled seqs are remembered for that, a bounded window).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from ..ipc import Sender, endpoint
from ..messages import Published, encode_ranges

REMEMBERED = 200_000  # settled seqs remembered per camera, to recognise late duplicates


@dataclass
class _Camera:
    handed: set[int] = field(default_factory=set)  # verdict queued for the broker, not settled yet
    settled: set[int] = field(default_factory=set)
    order: deque[int] = field(default_factory=deque)  # settled seqs, oldest first, for eviction
    unsent: list[int] = field(default_factory=list)  # settled, but capture could not be told yet


class PublishedTracker:
    """Per camera: verdicts handed to the publisher, settled by the broker, and told to capture."""

    def __init__(
        self, run_dir: Path, cameras: list[str], instance: str, context: zmq.Context, *, remembered: int = REMEMBERED
    ) -> None:
        self.instance = instance
        self._cameras = {camera: _Camera() for camera in cameras}
        self._to_capture = {camera: Sender(context, endpoint(run_dir, f"capture-{camera}")) for camera in cameras}
        self._remembered = remembered
        self._lock = threading.Lock()  # the decision thread and the publisher's threads share all of this

    def answered(self, camera: str, seq: int) -> bool:
        """True when this process already gave frame `seq` a verdict (a resent record is then a duplicate)."""
        with self._lock:
            state = self._cameras.get(camera)
            return state is not None and (seq in state.handed or seq in state.settled)

    def handed(self, camera: str, seq: int) -> None:
        with self._lock:
            if camera in self._cameras:
                self._cameras[camera].handed.add(seq)

    def settled(self, tag: object) -> None:
        """The publisher's callback (its threads): the verdict tagged (camera, seq) is with the broker."""
        if not isinstance(tag, tuple) or len(tag) != 2:
            return
        camera, seq = tag
        with self._lock:
            state = self._cameras.get(camera)
            if state is None or seq in state.settled:
                return
            state.handed.discard(seq)
            state.settled.add(seq)
            state.order.append(seq)
            while len(state.order) > self._remembered:
                state.settled.discard(state.order.popleft())
            state.unsent.append(seq)
            self._tell(camera, state)

    def heartbeat(self) -> None:
        """The decision thread, every second: whatever could not be told yet, and that this instance is alive."""
        with self._lock:
            for camera, state in self._cameras.items():
                self._tell(camera, state)
                self._to_capture[camera].send(Published(camera=camera, instance=self.instance, seqs=""))

    def _tell(self, camera: str, state: _Camera) -> None:
        """Send the camera's unsent settled seqs (caller holds the lock); what cannot be sent waits."""
        while state.unsent:
            text = encode_ranges(state.unsent)[0]
            if not self._to_capture[camera].send(Published(camera=camera, instance=self.instance, seqs=text)):
                return
            told = {seq for part in text.split(",") for seq in _expand(part)}
            state.unsent = [seq for seq in state.unsent if seq not in told]

    def unacknowledged(self) -> int:
        """Verdicts handed to the publisher that the broker has not acknowledged."""
        with self._lock:
            return sum(len(state.handed) for state in self._cameras.values())

    def close(self) -> None:
        with self._lock:
            for sender in self._to_capture.values():
                sender.close()


def _expand(part: str) -> range:
    first, _, last = part.partition("-")
    return range(int(first), int(last or first) + 1)
