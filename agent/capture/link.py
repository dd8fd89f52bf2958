"""Capture's end of the frame records: every record is kept until decision says the broker has its verdict.

Records go to decision in order (FrameReady, FrameFailed). Decision answers with Published: the seqs whose
verdicts the broker has acknowledged, and its own instance id. A record is forgotten only when published;
when the instance changes (decision restarted, losing what it held in memory: pending frames, early scores,
its MQTT queue), every record still held is sent again, marked `resent`, so the new decision process gives
each of those frames its verdict. Camera reconnects keep the link: nothing is lost or renumbered there.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import replace

import zmq

from ..config import AgentConfig
from ..ipc import Receiver, Sender, endpoint
from ..messages import FrameFailed, FrameReady, MessageError, Published, decode_ranges

log = logging.getLogger(__name__)

OUTBOX_LIMIT = 100_000  # records held for decision; past it the oldest is given up (and logged)

FrameRecord = FrameReady | FrameFailed


class DecisionLink:
    """The records of one camera on their way to decision, held until published."""

    def __init__(self, config: AgentConfig, camera: str, context: zmq.Context) -> None:
        self.camera, self.context = camera, context  # the camera's other sockets share the context
        self.to_decision = Sender(context, endpoint(config.run_dir, "decision"))
        self.acks = Receiver(context, endpoint(config.run_dir, f"capture-{camera}"))
        self._held: OrderedDict[int, FrameRecord] = OrderedDict()  # seq -> record, not yet published
        self._unsent: deque[FrameRecord] = deque()  # not handed to the socket yet (decision away, queue full)
        self._instance = ""
        self.given_up = 0
        self.applied = 0  # Published messages applied

    def send(self, record: FrameRecord) -> None:
        """Hand a record on (now, or as soon as decision takes it) and hold it until it is published."""
        self._held[record.seq] = record
        self._unsent.append(record)
        if len(self._held) > OUTBOX_LIMIT:
            seq, _ = self._held.popitem(last=False)
            self.given_up += 1
            log.error(
                "decision has not published %d frames of %s; frame %d will have no verdict",
                OUTBOX_LIMIT,
                self.camera,
                seq,
            )
        self.flush()

    def flush(self) -> None:
        """Send what decision has not been handed yet, in order; never blocks."""
        while self._unsent:
            record = self._unsent[0]
            if self._held.get(record.seq) is not record:  # published meanwhile, or given up
                self._unsent.popleft()
                continue
            if not self.to_decision.send(record):
                return
            self._unsent.popleft()

    def poll(self) -> None:
        """Apply decision's Published answers; after a decision restart, send every held record again."""
        for message in self.acks.receive_batch(64, timeout_ms=0):
            if not isinstance(message, Published) or message.camera != self.camera:
                continue
            if message.instance != self._instance:
                if self._instance:
                    log.warning(
                        "decision restarted (%s -> %s): sending %d unpublished frame records of %s again",
                        self._instance,
                        message.instance,
                        len(self._held),
                        self.camera,
                    )
                    self._resend()
                self._instance = message.instance
            try:
                ranges = decode_ranges(message.seqs)
            except MessageError as error:
                log.warning("ignored a Published message for %s: %s", self.camera, error)
                continue
            for first, last in ranges:
                self._forget(first, last)
            self.applied += 1

    def _forget(self, first: int, last: int) -> None:
        if last - first < len(self._held):
            for seq in range(first, last + 1):
                self._held.pop(seq, None)
        else:
            for seq in [seq for seq in self._held if first <= seq <= last]:
                del self._held[seq]

    def _resend(self) -> None:
        for seq, record in self._held.items():
            self._held[seq] = replace(record, resent=True)
        self._unsent = deque(self._held.values())
        self.flush()

    @property
    def held(self) -> int:
        """Records not yet published."""
        return len(self._held)

    def close(self) -> None:
        self.to_decision.close()
        self.acks.close()
