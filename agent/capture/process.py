"""Capture process: camera -> ring slot -> FrameReady (to engine and decision). One per camera.

Every frame the camera delivers, or says it lost, becomes exactly one message to decision:
FrameReady when its pixels are in a ring slot, FrameFailed (with the reason) when they are
not: ring full, broken buffer, frame-id gap. The loop never blocks on a slow consumer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import zmq

from ..config import AgentConfig, CameraConfig
from ..ipc import Sender, endpoint
from ..messages import FrameFailed, FrameReady, Heartbeat
from ..ring import ShmRing
from .base import CameraUnavailable, FrameInfo, FrameSource, SourceExhausted
from .sources import open_source

log = logging.getLogger(__name__)

SEQ_BLOCK = 256  # sequence numbers reserved on disk at a time, so a restart never reuses one
HEARTBEAT_S = 1.0
OUTBOX_LIMIT = 100_000  # frame records held for a restarting decision process


def ring_name(agent_id: str, camera: str) -> str:
    """Name of a camera's frame ring: stable, so a restarted capture replaces its predecessor's ring."""
    return f"lg-{agent_id}-{camera}"


class SequenceCounter:
    """Per-camera frame sequence that keeps increasing across capture restarts.

    Blocks of SEQ_BLOCK numbers are reserved in a file under state_dir before use, so a restarted
    capture starts past anything its predecessor may have sent (a visible gap, never a repeat).
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        text = path.read_text().strip() if path.exists() else ""
        self.next_seq = int(text) if text.isdigit() else 1
        self._reserved_until = self.next_seq
        self._reserve()

    def _reserve(self) -> None:
        self._reserved_until = self.next_seq + SEQ_BLOCK
        temporary = self._path.with_suffix(".tmp")
        temporary.write_text(str(self._reserved_until))
        temporary.replace(self._path)

    def take(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        if self.next_seq >= self._reserved_until:
            self._reserve()
        return seq


class CaptureLoop:
    """Moves one camera's frames into its ring and announces them."""

    def __init__(self, config: AgentConfig, camera: CameraConfig, source: FrameSource, context: zmq.Context) -> None:
        self.config, self.camera, self.source = config, camera, source
        shape = (source.height, source.width, source.channels)
        self.ring = ShmRing.create(
            ring_name(config.agent_id, camera.name), slot_count=config.ring.slots, slot_shape=shape, dtype=np.uint8
        )
        self.scratch = np.empty(shape, np.uint8)  # where frames go when the ring is full
        self.to_engine = Sender(context, endpoint(config.run_dir, "engine"))
        self.to_decision = Sender(context, endpoint(config.run_dir, "decision"))
        self.to_supervisor = Sender(context, endpoint(config.run_dir, "supervisor"))
        for sender in (self.to_engine, self.to_decision):
            if not sender.wait_connected(timeout_s=5.0):
                log.warning(
                    "%s is not reachable yet; frames wait for decision, the engine's fail at their deadline",
                    sender.address,
                )
        (config.state_dir / "sequence").mkdir(parents=True, exist_ok=True)
        self.sequence = SequenceCounter(config.state_dir / "sequence" / f"{camera.name}.seq")
        self.reclaim_after_ns = int(2 * config.decision.deadline_ms * 1e6)
        self._outbox: deque[FrameReady | FrameFailed] = deque()  # for decision, in order, while it is away
        self._slot: int | None = None  # a slot claimed but not yet filled
        self._slot_seq = 0
        self._next_heartbeat = 0.0

    def step(self) -> None:
        """Wait for one frame (or a timeout) and hand it on."""
        if self._slot is None:
            self._slot_seq = self.sequence.take()
            self._slot = self.ring.acquire(
                self._slot_seq, now_ns=time.monotonic_ns(), reclaim_after_ns=self.reclaim_after_ns
            )
        target = self.scratch if self._slot is None else self.ring.array(self._slot)
        info = self.source.read_into(target, timeout_s=0.2)
        self.heartbeat()
        if info is None:
            return
        seq, slot = self._report_missed(info), self._slot
        if slot is None:
            self._fail(seq, info, "ring full: engine or decision cannot keep up", cause="ring-full")
        elif not info.ok:
            self._fail(seq, info, info.reason or "camera delivered a broken frame", cause="capture-lost")
            self._slot_seq = self.sequence.take()  # keep the slot, give the next frame a fresh number
            self.ring.relabel(slot, seq, self._slot_seq)
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
            )
            self._to_decision(ready)
            self.to_engine.send(ready)  # if the engine is away, decision fails the frame at its deadline
        self._slot = None

    def _report_missed(self, info: FrameInfo) -> int:
        """Frames the camera lost before this one each get a failsafe; returns this frame's seq.

        The slot was claimed under a provisional number; publish() stamps the final one.
        """
        seq = self._slot_seq
        for _ in range(info.missed_before):
            self._fail(seq, info, "camera lost this frame (frame-id gap)", cause="capture-lost", frame_id=-1)
            seq = self.sequence.take()
        if seq != self._slot_seq and self._slot is not None:
            self.ring.relabel(self._slot, self._slot_seq, seq)
        self._slot_seq = seq
        return seq

    def _fail(self, seq: int, info: FrameInfo, reason: str, *, cause: str, frame_id: int | None = None) -> None:
        """One failsafe record for frame `seq`; `frame_id` overrides the camera's id (-1: a frame it never sent)."""
        failed = FrameFailed(
            camera=self.camera.name,
            seq=seq,
            t_capture_ns=info.t_capture_ns,
            reason=reason,
            cause=cause,
            camera_frame_id=info.camera_frame_id if frame_id is None else frame_id,
        )
        self._to_decision(failed)

    def _to_decision(self, message: FrameReady | FrameFailed) -> None:
        """Every frame record reaches decision, in order: held here while decision restarts."""
        self._outbox.append(message)
        self._flush_outbox()
        if len(self._outbox) > OUTBOX_LIMIT:
            lost = self._outbox.popleft()
            log.error(
                "decision unreachable for %d frames; frame %d of %s has no verdict", OUTBOX_LIMIT, lost.seq, lost.camera
            )

    def _flush_outbox(self) -> None:
        while self._outbox and self.to_decision.send(self._outbox[0]):
            self._outbox.popleft()

    def heartbeat(self) -> None:
        self._flush_outbox()
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT_S
            self.to_supervisor.send(
                Heartbeat(
                    process=f"capture-{self.camera.name}",
                    pid=os.getpid(),
                    t_ns=time.monotonic_ns(),
                    queue_depth=self.ring.occupancy(),
                )
            )

    def close(self) -> None:
        for sender in (self.to_engine, self.to_decision, self.to_supervisor):
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
    """The capture process body; returns the exit code."""
    camera = next(c for c in config.cameras if c.name == camera_name)
    context = zmq.Context()
    try:
        while not stop.is_set():
            source = open_with_backoff(camera, stop)
            if source is None:
                break
            loop = CaptureLoop(config, camera, source, context)
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
        context.term()
