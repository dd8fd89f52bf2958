"""Capture process: camera -> ring slot -> FrameReady (to engine and decision). One per camera.

Every frame the camera delivers, or says it lost, becomes exactly one record to decision:
FrameReady when its pixels are in a ring slot, FrameFailed (with the cause) when they are
not: ring full, broken buffer, frame-id gap. A frame's sequence number is taken when it
arrives, so a camera reconnect skips none. Records stay in the DecisionLink until decision
says they are published (a decision restart loses nothing). The loop never blocks on a slow
consumer, and it recreates its ring when the segment vanishes from /dev/shm.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque

import numpy as np
import zmq

from ..config import AgentConfig, CameraConfig
from ..ipc import Sender, endpoint
from ..messages import FrameFailed, FrameReady, Heartbeat
from ..ring import RingError, ShmRing
from .base import CameraUnavailable, FrameInfo, FrameSource, SourceExhausted
from .link import DecisionLink
from .sequence import SequenceCounter
from .sources import open_source

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
FAILING_WINDOW_S = 10.0  # every frame failing for this long is a problem the supervisor acts on


def ring_name(agent_id: str, camera: str) -> str:
    """Name of a camera's frame ring: stable, so a restarted capture replaces its predecessor's ring."""
    return f"lg-{agent_id}-{camera}"


class CaptureLoop:
    """Moves one camera's frames into its ring and announces them; one per opened camera."""

    def __init__(
        self,
        config: AgentConfig,
        camera: CameraConfig,
        source: FrameSource,
        link: DecisionLink,
        sequence: SequenceCounter,
    ) -> None:
        self.config, self.camera, self.source = config, camera, source
        self.link, self.sequence = link, sequence
        self.shape = (source.height, source.width, source.channels)
        self.ring = self._create_ring()
        self.scratch = np.empty(self.shape, np.uint8)  # where frames go when the ring is full
        self.to_engine = Sender(link.context, endpoint(config.run_dir, "engine"))
        self.to_supervisor = Sender(link.context, endpoint(config.run_dir, "supervisor"))
        for sender in (self.to_engine, link.to_decision):
            if not sender.wait_connected(timeout_s=5.0):
                log.warning(
                    "%s is not reachable yet; frames wait for decision, the engine's fail at their deadline",
                    sender.address,
                )
        self.reclaim_after_ns = int(2 * config.decision.deadline_ms * 1e6)
        self._slot: int | None = None  # a slot claimed but not yet filled
        self._slot_label = 0  # the number it was claimed under: the next seq, provisional until a frame arrives
        self._recent: deque[tuple[float, bool]] = deque()  # (monotonic s, frame ok) over FAILING_WINDOW_S
        self._next_heartbeat = 0.0

    def _create_ring(self) -> ShmRing:
        name = ring_name(self.config.agent_id, self.camera.name)
        return ShmRing.create(name, slot_count=self.config.ring.slots, slot_shape=self.shape, dtype=np.uint8)

    def step(self) -> None:
        """Wait for one frame (or a timeout) and hand it on."""
        if self._slot is None:
            self._slot_label = self.sequence.peek()
            self._slot = self.ring.acquire(
                self._slot_label, now_ns=time.monotonic_ns(), reclaim_after_ns=self.reclaim_after_ns
            )
        target = self.scratch if self._slot is None else self.ring.array(self._slot)
        info = self.source.read_into(target, timeout_s=0.2)
        self.heartbeat()
        if info is None:
            return
        for _ in range(info.missed_before):
            reason = "camera lost this frame (frame-id gap)"
            self._fail(self.sequence.take(), info, reason, cause="capture-lost", frame_id=-1)
        seq, slot = self.sequence.take(), self._slot
        if slot is not None and seq != self._slot_label:
            self.ring.relabel(slot, self._slot_label, seq)
        self._recent.append((time.monotonic(), info.ok and slot is not None))
        if slot is None:
            self._fail(seq, info, "ring full: engine or decision cannot keep up", cause="ring-full")
        elif not info.ok:
            self._fail(seq, info, info.reason or "camera delivered a broken frame", cause="capture-lost")
            self._slot_label = self.sequence.peek()  # keep the slot for the next frame
            self.ring.relabel(slot, seq, self._slot_label)
            return
        else:
            self.ring.publish(slot, seq, t_capture_ns=info.t_capture_ns)
            ready = FrameReady(
                camera=self.camera.name,
                seq=seq,
                ring=self.ring.name,
                slot=slot,
                t_capture_ns=info.t_capture_ns,
                height=self.source.height,
                width=self.source.width,
                channels=self.source.channels,
                camera_frame_id=info.camera_frame_id,
                camera_timestamp_ns=info.camera_timestamp_ns,
            )
            self.link.send(ready)
            self.to_engine.send(ready)  # if the engine is away, decision fails the frame at its deadline
        self._slot = None

    def _fail(self, seq: int, info: FrameInfo, reason: str, *, cause: str, frame_id: int | None = None) -> None:
        """One failsafe record for frame `seq`; `frame_id` overrides the camera's id (-1: a frame it never sent)."""
        failed = FrameFailed(
            camera=self.camera.name,
            seq=seq,
            t_capture_ns=info.t_capture_ns,
            reason=reason,
            cause=cause,
            camera_frame_id=info.camera_frame_id if frame_id is None else frame_id,
            camera_timestamp_ns=info.camera_timestamp_ns if frame_id is None else -1,
        )
        self.link.send(failed)

    def heartbeat(self) -> None:
        """Between frames: decision's acknowledgements, the ring's health, and the supervisor's heartbeat."""
        self.link.poll()
        self.link.flush()
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + HEARTBEAT_S
        self._recreate_ring_if_gone()
        self.to_supervisor.send(
            Heartbeat(
                process=f"capture-{self.camera.name}",
                pid=os.getpid(),
                t_ns=time.monotonic_ns(),
                queue_depth=self.ring.occupancy(),
                problem=self.problem(now),
                camera=self.camera.name,
            )
        )

    def problem(self, now: float) -> str:
        """What keeps this capture from its job ("" = nothing): every frame of the last FAILING_WINDOW_S failed."""
        while self._recent and self._recent[0][0] < now - FAILING_WINDOW_S:
            self._recent.popleft()
        if len(self._recent) >= 3 and not any(ok for _, ok in self._recent):
            return f"all {len(self._recent)} frames of the last {FAILING_WINDOW_S:.0f} s failed"
        return ""

    def _recreate_ring_if_gone(self) -> None:
        """A ring deleted from /dev/shm (a tmpfs clean-up, an operator) is made again; readers re-attach by name."""
        if not self.ring.replaced():
            return
        log.warning("ring %s vanished from /dev/shm; recreating it (frames in it get failsafe)", self.ring.name)
        old, self._slot = self.ring, None
        self.ring = self._create_ring()
        old.close()

    def close(self) -> None:
        for sender in (self.to_engine, self.to_supervisor):
            sender.close()
        self.source.close()
        self.ring.close()


def open_with_backoff(camera: CameraConfig, stop: threading.Event) -> FrameSource | None:
    """Open the camera, retrying with exponential backoff while it is unavailable; None if stopped."""
    wait_s = camera.reconnect_initial_s
    while not stop.is_set():
        try:
            return open_source(camera)
        except CameraUnavailable as error:
            log.warning("camera %s unavailable (%s); retrying in %.1f s", camera.name, error, wait_s)
            stop.wait(wait_s)
            wait_s = min(wait_s * 2, camera.reconnect_max_s)
    return None


def run(config: AgentConfig, camera_name: str, stop: threading.Event) -> int:
    """The capture process body; returns the exit code. The link and the sequence outlive camera reconnects."""
    camera = next(c for c in config.cameras if c.name == camera_name)
    context = zmq.Context()
    link = DecisionLink(config, camera.name, context)
    sequence = SequenceCounter(config.state_dir / "sequence", camera.name)
    try:
        while not stop.is_set():
            source = open_with_backoff(camera, stop)
            if source is None:
                break
            try:
                loop = CaptureLoop(config, camera, source, link, sequence)
            except RingError:
                source.close()
                raise
            log.info(
                "capturing %s: %dx%dx%d into ring %s",
                camera.name,
                source.width,
                source.height,
                source.channels,
                loop.ring.name,
            )
            try:
                while not stop.is_set():
                    loop.step()
            except CameraUnavailable as error:
                log.warning("camera %s lost: %s; reconnecting", camera.name, error)
            except SourceExhausted:
                log.info("camera %s: replay finished", camera.name)
                while not stop.wait(HEARTBEAT_S / 2):  # idle, alive, until the agent stops: no restart, no replay
                    loop.heartbeat()
            finally:
                loop.close()
        return 0
    finally:
        sequence.close()
        link.close()
        context.term()
