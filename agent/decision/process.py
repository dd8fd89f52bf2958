"""Decision process: one verdict per captured frame, published over MQTT.

Every FrameReady opens a pending frame with a deadline. It closes exactly once: with the
model's verdict when its score arrives in time, or with `failsafe` and the reason when the
engine failed it, when capture reported it lost, or when the deadline passed. A score that
arrives after its frame's failsafe is counted and dropped, never published twice.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from ..bundle import MANIFEST_FILE, BundleError, Manifest, parse_manifest, verify_bundle
from ..config import AgentConfig, CameraConfig
from ..contract import AgentStatus, Backend, CameraStatus, Health, HeatmapInfo, Latency, Topics, Verdict, clip
from ..ipc import Receiver, Sender, endpoint
from ..messages import (
    EngineStatus,
    FrameFailed,
    FrameReady,
    Heartbeat,
    Message,
    Scored,
    ScoreFailed,
)
from ..metrics import PipelineMetrics
from ..model_input import Preprocessor
from ..mqtt import MqttPublisher
from ..ring import AttachedRings, RingError
from ..rollout.store import serving_bundles, store_root
from ..samples.writer import SampleSink
from ..signing import load_trusted_keys
from .health import Assessment, CameraHealth, VerdictWindow, assess
from .heatmap import render_heatmap
from .published import PublishedTracker
from .rules import Decision, decide

log = logging.getLogger(__name__)

STATUS_PERIOD_S = 2.0
HEARTBEAT_S = 1.0
ENGINE_SILENT_NS = 1_000_000_000  # no EngineStatus this long: a frame past its deadline blames a down engine
# CLOCK_MONOTONIC is shared by every process on the host; this maps it to wall-clock time.
_WALL_OFFSET_NS = time.time_ns() - time.monotonic_ns()


@dataclass(slots=True)
class Pending:
    ready: FrameReady
    deadline_ns: int


@dataclass(frozen=True, slots=True)
class FrameRef:
    """What a verdict says about its frame, whatever became of it."""

    camera: str
    seq: int
    t_capture_ns: int
    camera_frame_id: int = -1
    camera_timestamp_ns: int = -1

    @classmethod
    def of(cls, record: FrameReady | FrameFailed) -> FrameRef:
        return cls(record.camera, record.seq, record.t_capture_ns, record.camera_frame_id, record.camera_timestamp_ns)


@dataclass(frozen=True, slots=True, order=True)
class _Held:
    """A failure waiting for the earlier frames of its camera; ordered by seq alone."""

    seq: int
    frame: FrameRef = field(compare=False)
    reason: str = field(compare=False)
    cause: str = field(compare=False)


class DecisionLoop:
    """Closes every frame with exactly one verdict."""

    def __init__(
        self,
        config: AgentConfig,
        manifests: Mapping[str, Manifest],
        publisher: MqttPublisher,
        published: PublishedTracker,
        context: zmq.Context,
    ) -> None:
        """manifests: model slot -> the manifest of the model serving it at start-up (config.model_bundles);
        published: the tracker the publisher reports settled verdicts to (its on_settled callback)."""
        self.config, self.publisher, self.published = config, publisher, published
        self.inbox = Receiver(context, endpoint(config.run_dir, "decision"))
        self.to_supervisor = Sender(context, endpoint(config.run_dir, "supervisor"))
        self.topics = Topics(config.mqtt.topic_prefix)
        labels = {slot: f"{manifest.model_id}@{manifest.model_version}" for slot, manifest in manifests.items()}
        self.manifests: dict[str, Manifest] = {labels[slot]: manifest for slot, manifest in manifests.items()}
        # The model that scores each camera: its slot's at start-up, then whichever model scored its latest frame.
        self.camera_model = {camera.name: labels[camera.model] for camera in config.cameras}
        self.single_model = len(manifests) == 1
        self.model_label = next(iter(labels.values()))  # with one model: the latest that scored (status.model)
        self.deadline_ns = int(config.decision.deadline_ms * 1e6)
        self.pending: dict[tuple[str, int], Pending] = {}
        self.early: dict[tuple[str, int], Scored | ScoreFailed] = {}
        self.held: dict[str, list[_Held]] = {}  # per camera: failures waiting for earlier frames, by seq
        self.last_seq: dict[str, int] = {}
        self.rings = AttachedRings()
        self.metrics = PipelineMetrics()
        self._frame_counts: dict[str, int] = {}
        self._next_status = 0.0
        self._next_heartbeat = 0.0
        self._heatmap_inputs: dict[tuple[int, int, int], np.ndarray] = {}  # model input shape -> buffer
        self.engine_status: EngineStatus | None = None
        self.started_ns = time.monotonic_ns()
        self._engine_seen_ns = self.started_ns  # the engine is given ENGINE_SILENT_NS to make itself heard
        self.duplicates = 0
        self.window = VerdictWindow(config.decision.health_window_s)
        self._last_health = "ok"
        # -- samples hook (agent/samples): which verdicts keep their frame, written off this thread --
        self.samples = (
            SampleSink(
                config, rings=self.rings, publisher=publisher, overlay=render_heatmap, registry=self.metrics.registry
            )
            if config.samples.enabled
            else None
        )

    # receive, act, send
    def step(self) -> None:
        timeout_ms = 10 if self.pending else 100
        for message in self.inbox.receive_batch(512, timeout_ms=timeout_ms):
            self._handle(message)
        self._expire(time.monotonic_ns())
        self._release_held()
        self._periodic()

    def _handle(self, message: Message) -> None:
        if isinstance(message, FrameReady | FrameFailed) and self._duplicate(message):
            return
        if isinstance(message, FrameReady):
            self._note_seq(message)
            key = (message.camera, message.seq)
            self.pending[key] = Pending(message, message.t_capture_ns + self.deadline_ns)
            early = self.early.pop(key, None)
            if early is not None:
                self._handle(early)
        elif isinstance(message, FrameFailed):
            self._note_seq(message)
            self._fail_in_order(FrameRef.of(message), message.reason, cause=message.cause)
        elif isinstance(message, Scored):
            self._engine_seen_ns = time.monotonic_ns()
            self._on_scored(message)
        elif isinstance(message, EngineStatus):
            self.engine_status, self._engine_seen_ns = message, time.monotonic_ns()
        elif isinstance(message, ScoreFailed):
            if self._is_early(message):
                return
            entry = self.pending.pop((message.camera, message.seq), None)
            if entry is not None:
                self._publish_failsafe(FrameRef.of(entry.ready), message.reason, cause=message.cause)
                self._release_frame(entry.ready)

    def _duplicate(self, record: FrameReady | FrameFailed) -> bool:
        """A record this process has already answered or is answering (capture resends after our restart)."""
        if (record.camera, record.seq) in self.pending or self.published.answered(record.camera, record.seq):
            self.duplicates += 1
            return True
        return False

    def _note_seq(self, record: FrameReady | FrameFailed) -> None:
        """A jump in a camera's sequence means frames whose records never reached us: fail each.

        Capture holds every record until its verdict is published, so a jump means capture itself died with
        records unsent (those frames did exist). Resent records fill earlier holes and are not counted here.
        """
        camera, seq = record.camera, record.seq
        if record.resent:
            return
        last = self.last_seq.get(camera)
        if last is not None and seq > last + 1:
            for missing in range(last + 1, seq):
                reason = "no record of this frame reached decision: capture stopped before sending it"
                self._fail_in_order(FrameRef(camera, missing, record.t_capture_ns), reason, cause="capture-lost")
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
        self._expire(time.monotonic_ns())  # an earlier frame past its deadline gets its failsafe first: seq order
        entry = self.pending.pop((scored.camera, scored.seq), None)
        if entry is None:
            self.metrics.late_scores.inc()
            self._release_map(scored)
            return
        manifest = self._manifest(scored.model)
        if manifest is None:
            reason = f"scored by model {scored.model}, whose manifest is not in the model store"
            self._publish_failsafe(FrameRef.of(entry.ready), reason, cause="model-unknown")
            self._release_map(scored)
            self._release_frame(entry.ready)
            return
        self.model_label = self.camera_model[scored.camera] = scored.model
        anomaly_map = self._read_map(scored)
        decision = decide(
            scored.score,
            anomaly_map,
            threshold=self._threshold(manifest),
            min_defect_area_px=self.config.decision.min_defect_area_px,
        )
        record = self._publish_verdict(entry.ready, decision, scored)
        if self.samples is not None:  # samples hook: before the frame's slot is released
            self.samples.offer(record, ready=entry.ready, anomaly_map=anomaly_map, manifest=manifest)
        if self._wants_heatmap(scored.camera, decision) and anomaly_map is not None:
            self._publish_heatmap(entry.ready, anomaly_map, scored.model)
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
        override = self.config.threshold_override(manifest.model_id)
        return override if override is not None else manifest.threshold.value

    def _expire(self, now_ns: int) -> None:
        if len(self.early) > 4 * self.config.ring.slots * len(self.config.cameras):
            self.early.clear()  # answers whose frames never were announced: their gaps were failed already
        expired = [key for key, entry in self.pending.items() if entry.deadline_ns <= now_ns]
        if not expired:
            return
        deadline = f"no score within the {self.config.decision.deadline_ms:.0f} ms deadline"
        if time.monotonic_ns() - self._engine_seen_ns > ENGINE_SILENT_NS:
            cause, reason = (
                "engine-down",
                f"{deadline}: the engine has not answered for over {ENGINE_SILENT_NS / 1e9:.0f} s",
            )
        else:
            cause, reason = "engine-late", f"{deadline}: the engine is running but behind"
        restarted = f"{deadline}: decision restarted while the frame was on its way, and its score was lost"
        for key in expired:
            entry = self.pending.pop(key)
            if entry.ready.resent or entry.ready.t_capture_ns < self.started_ns:
                self._publish_failsafe(FrameRef.of(entry.ready), restarted, cause="decision-restarted")
            else:
                self._publish_failsafe(FrameRef.of(entry.ready), reason, cause=cause)
            self._release_frame(entry.ready)

    def _publish_verdict(self, ready: FrameReady, decision: Decision, scored: Scored) -> Verdict:
        now = time.monotonic_ns()
        latency = Latency(
            capture_to_engine=_ms(scored.t_engine_start_ns - ready.t_capture_ns),
            inference=_ms(scored.t_engine_end_ns - scored.t_engine_start_ns),
            engine_to_decision=_ms(now - scored.t_engine_end_ns),
            total=_ms(now - ready.t_capture_ns),
        )
        for stage, value in latency.model_dump(exclude_none=True).items():
            self.metrics.latency.labels(stage).observe(value / 1e3)
        # decide() says failsafe only when the model gave no usable number or a map the rule needed is missing
        cause = "score-invalid" if decision.verdict == "failsafe" else None
        if cause is not None:
            self.metrics.failsafes.labels(ready.camera, cause).inc()
        score = scored.score if np.isfinite(scored.score) else None
        return self._send_verdict(
            FrameRef.of(ready), decision.verdict, decision.reason, cause, score, scored.model, latency
        )

    def _fail_in_order(self, frame: FrameRef, reason: str, *, cause: str) -> None:
        """Fail a frame capture could not deliver, once the earlier frames of its camera have their verdicts.

        Verdicts of one camera go out in seq order (a PLC may keep its parts in a FIFO): a ring-full or lost frame
        waits behind the earlier frames still being scored. That costs it nothing against the deadline: theirs
        come first, as their frames were captured first."""
        if any(camera == frame.camera and seq < frame.seq for camera, seq in self.pending):
            bisect.insort(self.held.setdefault(frame.camera, []), _Held(frame.seq, frame, reason, cause))
        else:
            self._publish_failsafe(frame, reason, cause=cause)

    def _release_held(self) -> None:
        """Publish the held failures no earlier pending frame of their camera holds back any more."""
        for camera in list(self.held):
            earliest = min((seq for each, seq in self.pending if each == camera), default=None)
            self._flush_held(camera, before=earliest)

    def _flush_held(self, camera: str, *, before: int | None) -> None:
        """Publish the camera's held failures with seq < before (None: all), in seq order."""
        held = self.held.get(camera, [])
        while held and (before is None or held[0].seq < before):
            entry = held.pop(0)
            self._publish_failsafe(entry.frame, entry.reason, cause=entry.cause)
        if not held:
            self.held.pop(camera, None)

    def _publish_failsafe(self, frame: FrameRef, reason: str, *, cause: str) -> None:
        self.metrics.failsafes.labels(frame.camera, cause).inc()
        latency = Latency(total=_ms(time.monotonic_ns() - frame.t_capture_ns))
        model = self.camera_model.get(frame.camera, self.model_label)
        record = self._send_verdict(frame, "failsafe", reason, cause, None, model, latency)
        if self.samples is not None:  # samples hook: failsafes keep their record and reason
            self.samples.offer(record)

    def _send_verdict(
        self,
        frame: FrameRef,
        verdict: str,
        reason: str,
        cause: str | None,
        score: float | None,
        model: str,
        latency: Latency,
    ) -> Verdict:
        if frame.camera in self.held:  # a held failure of an earlier frame goes first
            self._flush_held(frame.camera, before=frame.seq)
        record = Verdict(
            agent_id=self.config.agent_id,
            line=self.config.line,
            camera=frame.camera,
            seq=frame.seq,
            camera_frame_id=max(frame.camera_frame_id, -1),
            camera_timestamp_ns=frame.camera_timestamp_ns if frame.camera_timestamp_ns >= 0 else None,
            capture_ts=(frame.t_capture_ns + _WALL_OFFSET_NS) / 1e9,
            decided_ts=time.time(),
            verdict=verdict,  # type: ignore[arg-type]
            cause=cause,  # type: ignore[arg-type]
            reason=clip(reason, 500),
            score=score,
            threshold=self._threshold(self.manifests[model]),
            model=model,
            latency_ms=latency,
        )
        topic = self.topics.verdict(self.config.line, self.config.agent_id, frame.camera)
        self.published.handed(frame.camera, frame.seq)  # before publish: the broker's answer may come at once
        self.publisher.publish(topic, record, qos=self.config.mqtt.qos, tag=(frame.camera, frame.seq))
        self.metrics.verdicts.labels(frame.camera, verdict).inc()
        self._frame_counts[frame.camera] = self._frame_counts.get(frame.camera, 0) + 1
        self.window.add(frame.camera, time.monotonic(), cause)
        return record

    def _wants_heatmap(self, camera: str, decision: Decision) -> bool:
        mode = self.config.decision.heatmap
        if mode == "rejects":
            return decision.verdict == "reject"
        if mode == "every-nth":
            return self._frame_counts.get(camera, 0) % self.config.decision.heatmap_every_n == 0
        return mode == "all"

    def _publish_heatmap(self, ready: FrameReady, anomaly_map: np.ndarray, model: str) -> None:
        try:
            frame = self.rings.read(ready.ring, ready.slot, ready.seq)
        except RingError as error:
            log.warning("no heatmap for %s seq %d: %s", ready.camera, ready.seq, error)
            return
        camera = next(c for c in self.config.cameras if c.name == ready.camera)
        manifest = self.manifests[model]
        shape = (manifest.input.height, manifest.input.width, manifest.input.channels)
        model_input = Preprocessor(camera.roi, frame.shape, shape, camera.pixel_format)
        buffer = self._heatmap_inputs.get(shape)
        if buffer is None:
            buffer = self._heatmap_inputs[shape] = np.empty(shape, np.uint8)
        view = model_input(frame, out=buffer)
        norm = manifest.score_normalisation
        image = render_heatmap(
            view, anomaly_map, low=norm.map_low, high=norm.map_high, image_format=self.config.decision.heatmap_format
        )
        info = HeatmapInfo(
            agent_id=self.config.agent_id,
            camera=ready.camera,
            seq=ready.seq,
            model=model,
            format=self.config.decision.heatmap_format,
        )
        self.publisher.publish_bytes(
            self.topics.heatmap(self.config.line, self.config.agent_id, ready.camera),
            image,
            qos=0,
            user_properties=info.user_properties(),
            content_type=info.content_type,
        )

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
            self.published.heartbeat()
            self.to_supervisor.send(
                Heartbeat(process="decision", pid=os.getpid(), t_ns=time.monotonic_ns(), queue_depth=len(self.pending))
            )
        if now >= self._next_status:
            self._next_status = now + STATUS_PERIOD_S
            self.metrics.pending.set(len(self.pending))
            for ring, used in self.rings.occupancy().items():
                self.metrics.ring_occupancy.labels(ring).set(used)
            self.metrics.mqtt_queued.set(self.publisher.queued)
            status = self.status(online=True)
            self.publisher.publish(self.topics.status(self.config.agent_id), status, qos=1, retain=True)
            write_status_file(self.config.run_dir, status)

    def camera_health(self, now: float) -> dict[str, CameraHealth]:
        running_s = now - self.started_ns / 1e9
        return {
            camera.name: self.window.camera(camera.name, now, expected_fps=_expected_fps(camera), running_s=running_s)
            for camera in self.config.cameras
        }

    def assess(self, cameras: dict[str, CameraHealth], now: float) -> Assessment:
        silent_s = (time.monotonic_ns() - self._engine_seen_ns) / 1e9
        engine_problem = self.engine_status.problem if self.engine_status is not None else ""
        assessment = assess(
            cameras,
            engine_problem=engine_problem,
            engine_silent_s=silent_s if silent_s > ENGINE_SILENT_NS / 1e9 else 0.0,
            mqtt_queued=self.publisher.queued,
            window_s=self.window.window_s,
        )
        for state in ("ok", "degraded", "failing"):
            self.metrics.health.labels(state).set(1 if assessment.state == state else 0)
        if assessment.state != self._last_health:
            level = logging.INFO if assessment.state == "ok" else logging.WARNING
            log.log(level, "health %s: %s", assessment.state, "; ".join(assessment.reasons) or "every frame scored")
            self._last_health = assessment.state
        return assessment

    def status(self, *, online: bool, reason: str = "") -> AgentStatus:
        engine = self.engine_status
        now = time.monotonic()
        cameras = self.camera_health(now)
        for name, health in cameras.items():
            self.metrics.fps.labels(name).set(health.fps)
            self.metrics.failsafe_share.labels(name).set(health.failsafe_share)
        assessment = self.assess(cameras, now) if online else None
        return AgentStatus(
            agent_id=self.config.agent_id,
            line=self.config.line,
            online=online,
            health=None
            if assessment is None
            else Health(state=assessment.state, reasons=tuple(clip(text, 500) for text in assessment.reasons[:32])),
            model=self.model_label if self.single_model else None,
            cameras={
                name: CameraStatus(
                    model=self.camera_model[name],
                    fps=health.fps,
                    expected_fps=health.expected_fps,
                    failsafe_share=health.failsafe_share,
                    failsafes=health.failsafes,  # type: ignore[arg-type]  # causes come from FAILSAFE_CAUSES
                )
                for name, health in cameras.items()
            },
            queue_depth=len(self.pending),
            mqtt_queued=self.publisher.queued,
            backend=None if engine is None else Backend(name=engine.backend[:32], detail=clip(engine.detail, 500)),
            reason=reason,
            deadline_ms=self.config.decision.deadline_ms,
            ts=time.time(),
        )

    def drain(self, timeout_s: float) -> None:
        """Close every pending frame (scores that still arrive, else failsafe) before exit."""
        end = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < end:
            for message in self.inbox.receive_batch(512, timeout_ms=10):
                self._handle(message)
            self._expire(time.monotonic_ns())
        self._expire(time.monotonic_ns() + 10**15)  # anything left: failsafe now, never silence
        self._release_held()

    def close(self) -> None:
        if self.samples is not None:  # samples hook: write what is queued while the publisher still runs
            self.samples.close()
        self.rings.close()
        self.inbox.close()
        self.to_supervisor.close()
        self.published.close()


def run(config: AgentConfig, stop: threading.Event) -> int:
    """The decision process body; returns the exit code."""
    trusted = load_trusted_keys(config.engine.trusted_keys)
    manifests = {
        slot: verify_bundle(bundle, trusted, require_signature=config.engine.require_signature)
        for slot, bundle in serving_bundles(config).items()
    }
    will = AgentStatus(
        agent_id=config.agent_id, line=config.line, online=False, reason="connection lost", ts=time.time()
    )
    context = zmq.Context()
    instance = f"{os.getpid()}-{time.time_ns()}"  # capture sends its held records again when this changes
    published = PublishedTracker(config.run_dir, [camera.name for camera in config.cameras], instance, context)
    publisher = MqttPublisher(
        config.mqtt,
        client_id=config.mqtt.client_id or f"lineguard-{config.agent_id}",
        status_topic=Topics(config.mqtt.topic_prefix).status(config.agent_id),
        will=will,
        on_settled=published.settled,
    )
    loop = DecisionLoop(config, manifests, publisher, published, context)
    loop.metrics.serve(config.metrics.host, config.metrics.port)
    try:
        while not stop.is_set():
            loop.step()
        loop.drain(timeout_s=2 * config.decision.deadline_ms / 1e3)
    finally:
        loop.close()
        publisher.close(offline_status=loop.status(online=False, reason="stopped"))
        context.term()
    return 0


def _ms(duration_ns: int) -> float:
    """Milliseconds, rounded to microseconds; never negative (clocks of one host, but be safe)."""
    return round(max(duration_ns, 0) / 1e6, 3)


def _expected_fps(camera: CameraConfig) -> float | None:
    """The rate a camera should deliver: configured, its replay rate, or the rate set on a free-running GigE camera;
    None (unchecked) for other live cameras."""
    if camera.expected_fps is not None:
        return camera.expected_fps or None
    if camera.source == "gige" and camera.trigger == "free-run" and camera.acquisition_fps is not None:
        return camera.acquisition_fps
    return camera.fps if camera.source in ("folder", "video") else None


STATUS_FILE = "status.json"


def write_status_file(run_dir: Path, status: AgentStatus) -> None:
    """The latest status in run_dir for `lineguard-agent status` on this machine (works with the broker away)."""
    path = run_dir / STATUS_FILE
    temporary = run_dir / f".{STATUS_FILE}.tmp"
    try:
        temporary.write_bytes(status.encode())
        temporary.replace(path)
    except OSError as error:
        log.warning("cannot write %s: %s", path, error)
