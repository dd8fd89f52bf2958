"""Decision process: one verdict per captured frame, published over MQTT.

Every FrameReady opens a pending frame with a deadline. It closes exactly once: with the
model's verdict when its score arrives in time, or with `failsafe` and the reason when the
engine failed it, when capture reported it lost, or when the deadline passed. A score that
arrives after its frame's failsafe is counted and dropped, never published twice.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import zmq

from ..bundle import MANIFEST_FILE, BundleError, Manifest, parse_manifest, verify_bundle
from ..config import AgentConfig
from ..ipc import Receiver, Sender, endpoint
from ..messages import EngineStatus, FrameFailed, FrameReady, Heartbeat, Message, Scored, ScoreFailed
from ..metrics import PipelineMetrics
from ..model_input import Preprocessor
from ..models import serving_bundle, store_root
from ..mqtt import MqttPublisher, topics
from ..ring import AttachedRings, RingError
from ..signing import load_trusted_keys
from .heatmap import render_heatmap
from .rules import Decision, decide

log = logging.getLogger(__name__)

STATUS_PERIOD_S = 2.0
HEARTBEAT_S = 1.0
# CLOCK_MONOTONIC is shared by every process on the host; this maps it to wall-clock time.
_WALL_OFFSET_NS = time.time_ns() - time.monotonic_ns()


@dataclass(slots=True)
class Pending:
    ready: FrameReady
    deadline_ns: int


class DecisionLoop:
    """Closes every frame with exactly one verdict."""

    def __init__(self, config: AgentConfig, manifest: Manifest, publisher: MqttPublisher, context: zmq.Context) -> None:
        self.config, self.publisher = config, publisher
        self.inbox = Receiver(context, endpoint(config.run_dir, "decision"))
        self.to_supervisor = Sender(context, endpoint(config.run_dir, "supervisor"))
        self.topics = topics(config.mqtt.topic_prefix, config.line, config.agent_id)
        self.model_label = f"{manifest.model_id}@{manifest.model_version}"
        self.manifests: dict[str, Manifest] = {self.model_label: manifest}
        self.deadline_ns = int(config.decision.deadline_ms * 1e6)
        self.pending: dict[tuple[str, int], Pending] = {}
        self.early: dict[tuple[str, int], Scored | ScoreFailed] = {}
        self.last_seq: dict[str, int] = {}
        self.rings = AttachedRings()
        self.metrics = PipelineMetrics()
        self.published: dict[str, int] = {}
        self._frame_counts: dict[str, int] = {}
        self._next_status = 0.0
        self._next_heartbeat = 0.0
        self._last_status_t = time.monotonic()
        spec = manifest.input
        self._heatmap_input = np.empty((spec.height, spec.width, spec.channels), np.uint8)
        self.engine_status: EngineStatus | None = None

    # receive, act, send
    def step(self) -> None:
        timeout_ms = 10 if self.pending else 100
        for message in self.inbox.receive_batch(512, timeout_ms=timeout_ms):
            self._handle(message)
        self._expire(time.monotonic_ns())
        self._periodic()

    def _handle(self, message: Message) -> None:
        if isinstance(message, FrameReady):
            self._note_seq(message.camera, message.seq, message.t_capture_ns)
            key = (message.camera, message.seq)
            self.pending[key] = Pending(message, message.t_capture_ns + self.deadline_ns)
            early = self.early.pop(key, None)
            if early is not None:
                self._handle(early)
        elif isinstance(message, FrameFailed):
            self._note_seq(message.camera, message.seq, message.t_capture_ns)
            self._publish_failsafe(message.camera, message.seq, message.t_capture_ns, message.reason, cause="capture")
        elif isinstance(message, Scored):
            self._on_scored(message)
        elif isinstance(message, EngineStatus):
            self.engine_status = message
        elif isinstance(message, ScoreFailed):
            if self._is_early(message):
                return
            entry = self.pending.pop((message.camera, message.seq), None)
            if entry is not None:
                self._publish_failsafe(
                    message.camera, message.seq, entry.ready.t_capture_ns, message.reason, cause="engine"
                )
                self._release_frame(entry.ready)

    def _note_seq(self, camera: str, seq: int, t_capture_ns: int) -> None:
        """A jump in a camera's sequence means frames whose records never reached us: fail each."""
        last = self.last_seq.get(camera)
        if last is not None and seq > last + 1:
            for missing in range(last + 1, seq):
                self._publish_failsafe(
                    camera, missing, t_capture_ns, "no record of this frame reached decision", cause="gap"
                )
        if last is None or seq > last:
            self.last_seq[camera] = seq

    def _is_early(self, message: Scored | ScoreFailed) -> bool:
        """Capture's FrameReady and the engine's answer come from different sockets, in either order.

        An answer for a frame not announced yet is kept until its FrameReady arrives (or expires).
        """
        key = (message.camera, message.seq)
        if key in self.pending or message.seq <= self.last_seq.get(message.camera, -1):
            return False
        self.early[key] = message
        return True

    def _on_scored(self, scored: Scored) -> None:
        if self._is_early(scored):
            return
        entry = self.pending.pop((scored.camera, scored.seq), None)
        if entry is None:
            self.metrics.late_scores.inc()
            self._release_map(scored)
            return
        manifest = self._manifest(scored.model)
        if manifest is None:
            reason = f"scored by model {scored.model}, whose manifest is not in the model store"
            self._publish_failsafe(scored.camera, scored.seq, entry.ready.t_capture_ns, reason, cause="engine")
            self._release_map(scored)
            self._release_frame(entry.ready)
            return
        self.model_label = scored.model
        anomaly_map = self._read_map(scored)
        decision = decide(
            scored.score,
            anomaly_map,
            threshold=self._threshold(manifest),
            min_defect_area_px=self.config.decision.min_defect_area_px,
        )
        self._publish_verdict(entry.ready, decision, scored)
        if self._wants_heatmap(scored.camera, decision) and anomaly_map is not None:
            self._publish_heatmap(entry.ready, anomaly_map)
        self._release_map(scored)
        self._release_frame(entry.ready)

    def _manifest(self, label: str) -> Manifest | None:
        """The manifest of the model that scored a frame: the start-up one, or from the model store after a swap."""
        manifest = self.manifests.get(label)
        if manifest is None:
            path = store_root(self.config.state_dir) / label / MANIFEST_FILE
            try:
                manifest = self.manifests[label] = parse_manifest(path.read_bytes(), source=str(path))
            except (OSError, BundleError) as error:
                log.error("cannot read the manifest of model %s: %s", label, error)
                return None
        return manifest

    def _threshold(self, manifest: Manifest) -> float:
        override = self.config.decision.threshold
        return override if override is not None else manifest.threshold.value

    def _expire(self, now_ns: int) -> None:
        if len(self.early) > 4 * self.config.ring.slots * len(self.config.cameras):
            self.early.clear()  # answers whose frames never were announced: their gaps were failed already
        expired = [key for key, entry in self.pending.items() if entry.deadline_ns <= now_ns]
        for key in expired:
            entry = self.pending.pop(key)
            reason = f"no score within the {self.config.decision.deadline_ms:.0f} ms deadline (engine down or behind)"
            self._publish_failsafe(
                entry.ready.camera, entry.ready.seq, entry.ready.t_capture_ns, reason, cause="deadline"
            )
            self._release_frame(entry.ready)

    def _publish_verdict(self, ready: FrameReady, decision: Decision, scored: Scored) -> None:
        now = time.monotonic_ns()
        latency_ms = {
            "capture_to_engine": (scored.t_engine_start_ns - ready.t_capture_ns) / 1e6,
            "inference": (scored.t_engine_end_ns - scored.t_engine_start_ns) / 1e6,
            "engine_to_decision": (now - scored.t_engine_end_ns) / 1e6,
            "total": (now - ready.t_capture_ns) / 1e6,
        }
        for stage, value in latency_ms.items():
            self.metrics.latency.labels(stage).observe(value / 1e3)
        self._send_verdict(
            ready.camera,
            ready.seq,
            ready.t_capture_ns,
            decision.verdict,
            decision.reason,
            score=scored.score,
            model=scored.model,
            latency_ms=latency_ms,
        )

    def _publish_failsafe(self, camera: str, seq: int, t_capture_ns: int, reason: str, *, cause: str) -> None:
        self.metrics.failsafes.labels(camera, cause).inc()
        latency = {"total": (time.monotonic_ns() - t_capture_ns) / 1e6}
        self._send_verdict(
            camera, seq, t_capture_ns, "failsafe", reason, score=None, model=self.model_label, latency_ms=latency
        )

    def _send_verdict(
        self,
        camera: str,
        seq: int,
        t_capture_ns: int,
        verdict: str,
        reason: str,
        *,
        score: float | None,
        model: str,
        latency_ms: dict[str, float],
    ) -> None:
        payload = {
            "seq": seq,
            "camera": camera,
            "capture_ts": (t_capture_ns + _WALL_OFFSET_NS) / 1e9,
            "decided_ts": time.time(),
            "verdict": verdict,
            "reason": reason,
            "score": score,
            "threshold": self._threshold(self.manifests[self.model_label]),
            "model": model,
            "latency_ms": {k: round(v, 3) for k, v in latency_ms.items()},
        }
        self.publisher.publish_json(self.topics.verdict(camera), payload, qos=self.config.mqtt.qos)
        self.metrics.verdicts.labels(camera, verdict).inc()
        self._frame_counts[camera] = self._frame_counts.get(camera, 0) + 1

    def _wants_heatmap(self, camera: str, decision: Decision) -> bool:
        mode = self.config.decision.heatmap
        if mode == "rejects":
            return decision.verdict == "reject"
        if mode == "every-nth":
            return self._frame_counts.get(camera, 0) % self.config.decision.heatmap_every_n == 0
        return mode == "all"

    def _publish_heatmap(self, ready: FrameReady, anomaly_map: np.ndarray) -> None:
        try:
            frame = self.rings.read(ready.ring, ready.slot, ready.seq)
        except RingError as error:
            log.warning("no heatmap for %s seq %d: %s", ready.camera, ready.seq, error)
            return
        camera = next(c for c in self.config.cameras if c.name == ready.camera)
        spec = self.manifests[self.model_label].input
        model_input = Preprocessor(
            camera.roi, frame.shape, (spec.height, spec.width, spec.channels), camera.pixel_format
        )
        view = model_input(frame, out=self._heatmap_input)
        norm = self.manifests[self.model_label].score_normalisation
        image = render_heatmap(
            view, anomaly_map, low=norm.map_low, high=norm.map_high, image_format=self.config.decision.heatmap_format
        )
        self.publisher.publish_bytes(self.topics.heatmap(ready.camera), image, qos=0)

    def _read_map(self, scored: Scored) -> np.ndarray | None:
        """A copy of the frame's (H, W) float32 anomaly map, or None when it did not fit the map ring."""
        if scored.map_slot < 0:
            return None
        try:
            return self.rings.read(scored.map_ring, scored.map_slot, scored.seq).copy()
        except RingError as error:
            log.warning("anomaly map of %s seq %d unavailable: %s", scored.camera, scored.seq, error)
            return None

    def _release_frame(self, ready: FrameReady) -> None:
        self.rings.release(ready.ring, ready.slot, ready.seq)  # False: its capture restarted; nothing to free

    def _release_map(self, scored: Scored) -> None:
        if scored.map_slot >= 0:
            self.rings.release(scored.map_ring, scored.map_slot, scored.seq)

    def _periodic(self) -> None:
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT_S
            self.to_supervisor.send(
                Heartbeat(process="decision", pid=os.getpid(), t_ns=time.monotonic_ns(), queue_depth=len(self.pending))
            )
        if now >= self._next_status:
            self._next_status = now + STATUS_PERIOD_S
            elapsed = max(now - self._last_status_t, 1e-6)
            fps = {camera: round(count / elapsed, 2) for camera, count in self._frame_counts.items()}
            for camera, value in fps.items():
                self.metrics.fps.labels(camera).set(value)
            self._frame_counts = {}
            self._last_status_t = now
            self.metrics.pending.set(len(self.pending))
            for ring, used in self.rings.occupancy().items():
                self.metrics.ring_occupancy.labels(ring).set(used)
            self.metrics.mqtt_queued.set(self.publisher.queued)
            self.publisher.publish_json(self.topics.status, self.status(fps), qos=1, retain=True)

    def status(self, fps: dict[str, float]) -> dict[str, object]:
        return {
            "online": True,
            "agent": self.config.agent_id,
            "model": self.model_label,
            "fps": fps,
            "queue_depth": len(self.pending),
            "mqtt_queued": self.publisher.queued,
            "backend": None
            if self.engine_status is None
            else {"name": self.engine_status.backend, "detail": self.engine_status.detail},
            "ts": time.time(),
        }

    def drain(self, timeout_s: float) -> None:
        """Close every pending frame (scores that still arrive, else failsafe) before exit."""
        end = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < end:
            for message in self.inbox.receive_batch(512, timeout_ms=10):
                self._handle(message)
            self._expire(time.monotonic_ns())
        self._expire(time.monotonic_ns() + 10**15)  # anything left: failsafe now, never silence

    def close(self) -> None:
        self.rings.close()
        self.inbox.close()
        self.to_supervisor.close()


def run(config: AgentConfig, stop: threading.Event) -> int:
    """The decision process body; returns the exit code."""
    manifest = verify_bundle(
        serving_bundle(config.state_dir, config.engine.bundle),
        load_trusted_keys(config.engine.trusted_keys),
        require_signature=config.engine.require_signature,
    )
    agent_topics = topics(config.mqtt.topic_prefix, config.line, config.agent_id)
    publisher = MqttPublisher(
        config.mqtt, client_id=config.mqtt.client_id or f"lineguard-{config.agent_id}", status_topic=agent_topics.status
    )
    context = zmq.Context()
    loop = DecisionLoop(config, manifest, publisher, context)
    loop.metrics.serve(config.metrics.host, config.metrics.port)
    try:
        while not stop.is_set():
            loop.step()
        loop.drain(timeout_s=2 * config.decision.deadline_ms / 1e3)
    finally:
        loop.close()
        offline = {**loop.status({}), "online": False}
        publisher.close(offline_status=offline)
        context.term()
    return 0
