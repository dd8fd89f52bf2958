"""The decision process's side of the sample store: pick, copy the small model view, queue; one thread writes.

`SampleSink.offer` runs on the decision loop for every verdict. For most accepts it is one comparison and a
hash. For a verdict the policy keeps, it checks the camera's per-minute budget and the queue (a full one drops
the sample, counted and logged, never waits), crops and resizes the frame's ROI to the model's view (the same
work as a heatmap; about a millisecond at 2048 x 2048) and hands copies of view and map to the queue. The
writer thread, at the lowest CPU priority, encodes, writes (samples.store), evicts and announces each sample
as a SampleRecord with a small JPEG thumbnail. A sample that cannot be written is dropped and counted; a frame
is never late because of one.
"""

from __future__ import annotations

import base64
import logging
import os
import queue
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass, replace

import cv2
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from ..bundle import Manifest
from ..config import AgentConfig
from ..contract import SampleRecord, Topics, Verdict
from ..contract.samples import MAX_THUMBNAIL_CHARS
from ..messages import FrameReady
from ..model_input import InputMismatch, Preprocessor
from ..mqtt import MqttPublisher
from ..ring import AttachedRings, RingError
from .policy import SamplePolicy
from .ratelimit import RateLimit
from .store import Budgets, NewSample, SampleStore, SampleStoreError, samples_root

log = logging.getLogger(__name__)

DROP_LOG_INTERVAL_S = 10.0
Overlay = Callable[..., bytes]  # decision.heatmap.render_heatmap(view, map, *, low, high, image_format)


class SampleMetrics:
    """Prometheus counters of the sample store, on the decision process's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.stored = Counter("lineguard_samples_stored", "Samples written", ["camera", "kind"], registry=registry)
        self.evicted = Counter(
            "lineguard_samples_evicted",
            "Samples removed to keep a class within budget",
            ["camera", "kind"],
            registry=registry,
        )
        self.dropped = Counter(
            "lineguard_samples_dropped",
            "Samples not kept: rate-limit, queue-full, write-failed",
            ["camera", "reason"],
            registry=registry,
        )
        self.queued = Gauge("lineguard_samples_queued", "Samples waiting for the writer thread", registry=registry)


@dataclass(frozen=True, slots=True)
class _Job:
    sample: NewSample
    t_offered_ns: int


class SampleSink:
    """Keeps samples of one agent's verdicts: policy on the decision thread, writing on its own thread."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        rings: AttachedRings,
        publisher: MqttPublisher | None,
        overlay: Overlay,
        registry: CollectorRegistry | None = None,
    ) -> None:
        settings = config.samples
        self.config, self.rings, self.publisher, self.overlay = config, rings, publisher, overlay
        self.policy = SamplePolicy.of(settings, config.agent_id)
        self.store = SampleStore(
            samples_root(config), Budgets(settings.max_per_class, settings.max_bytes_per_class, settings.min_free_bytes)
        )
        self.topics = Topics(config.mqtt.topic_prefix)
        self.metrics = SampleMetrics(registry or CollectorRegistry())
        self.drops: Tally[str] = Tally()
        self.stored = 0
        self._limits: dict[str, RateLimit] = {}
        self._preprocessors: dict[tuple[str, tuple[int, ...], tuple[int, int, int]], Preprocessor] = {}
        self._cameras = {camera.name: camera for camera in config.cameras}
        self._last_drop_log: dict[str, float] = {}
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=settings.queue_length)
        self._thread = threading.Thread(target=self._run, name="sample-writer", daemon=True)
        self._thread.start()
        log.info("sample store %s: %d samples held", self.store.root, self.store.count())

    # -- decision thread: never blocks ------------------------------------------------------------------------

    def offer(
        self,
        verdict: Verdict,
        *,
        ready: FrameReady | None = None,
        anomaly_map: np.ndarray | None = None,
        manifest: Manifest | None = None,
    ) -> None:
        """Consider one published verdict. ready: its frame, still held in its ring slot; anomaly_map: (h, w)
        float32, a copy the caller no longer uses; manifest: the model that scored it (None for failsafes)."""
        scale = manifest.score_normalisation.scale if manifest is not None else 1.0
        kind = self.policy.kind(
            verdict.verdict,
            verdict.score,
            threshold=verdict.threshold,
            scale=scale,
            camera=verdict.camera,
            seq=verdict.seq,
        )
        if kind is None:
            return
        if not self._limit(verdict.camera).allow():
            self._drop(verdict.camera, "rate-limit", f"samples.max_per_minute ({self.config.samples.max_per_minute})")
            return
        if self._queue.full():
            self._drop(verdict.camera, "queue-full", f"{self._queue.maxsize} samples wait for the disk")
            return
        sample = NewSample(kind, verdict)
        if ready is not None and manifest is not None:
            sample = self._with_pixels(sample, ready, anomaly_map, manifest)
        self._queue.put_nowait(_Job(sample, time.monotonic_ns()))  # one producer: not full since the check

    def _with_pixels(
        self, sample: NewSample, ready: FrameReady, anomaly_map: np.ndarray | None, manifest: Manifest
    ) -> NewSample:
        """The sample with copies of the model's view (and the ROI when asked); the record alone if the frame is gone."""
        spec = manifest.input
        input_shape = (spec.height, spec.width, spec.channels)
        try:
            frame = self.rings.read(ready.ring, ready.slot, ready.seq)
            prep = self._preprocessor(ready.camera, frame.shape, input_shape)
            view = prep(frame, np.empty(input_shape, np.uint8))
        except (RingError, InputMismatch) as error:
            log.debug("sample %s seq %d keeps no pixels: %s", ready.camera, ready.seq, error)
            return sample
        x, y, w, h = prep.box
        norm = manifest.score_normalisation
        keep_roi = self.config.samples.full_roi
        return replace(
            sample,
            view=view,
            anomaly_map=anomaly_map,
            roi=frame[y : y + h, x : x + w].copy() if keep_roi else None,
            roi_format=prep.source_format,
            roi_box=(x, y, w, h),
            map_range=(norm.map_low, norm.map_high),
        )

    def _preprocessor(
        self, camera: str, frame_shape: tuple[int, ...], input_shape: tuple[int, int, int]
    ) -> Preprocessor:
        key = (camera, frame_shape, input_shape)
        prep = self._preprocessors.get(key)
        if prep is None:
            settings = self._cameras[camera]
            shape = (frame_shape[0], frame_shape[1], frame_shape[2] if len(frame_shape) == 3 else 1)
            prep = self._preprocessors[key] = Preprocessor(settings.roi, shape, input_shape, settings.pixel_format)
        return prep

    def _limit(self, camera: str) -> RateLimit:
        limit = self._limits.get(camera)
        if limit is None:
            limit = self._limits[camera] = RateLimit(self.config.samples.max_per_minute)
        return limit

    def _drop(self, camera: str, reason: str, detail: str) -> None:
        """Count a sample not kept; log at most one WARNING per reason every DROP_LOG_INTERVAL_S."""
        self.drops[reason] += 1
        self.metrics.dropped.labels(camera, reason).inc()
        now = time.monotonic()
        if now - self._last_drop_log.get(reason, -DROP_LOG_INTERVAL_S) >= DROP_LOG_INTERVAL_S:
            self._last_drop_log[reason] = now
            log.warning("sample of %s dropped (%s: %s); %d dropped so far", camera, reason, detail, self.drops.total())

    # -- writer thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # the decision loop keeps the CPU
        except (OSError, AttributeError) as error:
            log.debug("could not lower the sample writer's priority: %s", error)
        while (job := self._queue.get()) is not None:
            self.metrics.queued.set(self._queue.qsize())
            try:
                self._write(job.sample)
            except Exception:  # top of the writer thread: one bad sample must not stop the store
                log.exception("writing sample %s failed", job.sample.sample_id)
                self._drop(job.sample.verdict.camera, "write-failed", "unexpected error")

    def _write(self, sample: NewSample) -> None:
        camera = sample.verdict.camera
        if sample.view is not None:
            sample = replace(sample, thumbnail=self._thumbnail(sample))
        try:
            stored = self.store.add(sample)
        except SampleStoreError as error:
            self._drop(camera, "write-failed", str(error))
            return
        self.stored += 1
        self.metrics.stored.labels(camera, sample.kind).inc()
        if stored.evicted:
            self.metrics.evicted.labels(camera, sample.kind).inc(len(stored.evicted))
        self._announce(sample, stored.sample_id)

    def _thumbnail(self, sample: NewSample) -> bytes:
        """A JPEG of the view (with the map in colour when there is one), its longer side samples.thumbnail_px."""
        view = sample.view
        assert view is not None
        height, width = view.shape[:2]
        factor = self.config.samples.thumbnail_px / max(height, width)
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        small = cv2.resize(view, size, interpolation=cv2.INTER_AREA).reshape(size[1], size[0], view.shape[2])
        if sample.anomaly_map is None or sample.map_range is None:
            plain = cv2.cvtColor(small, cv2.COLOR_RGB2BGR) if small.shape[2] == 3 else small
            ok, encoded = cv2.imencode(".jpg", plain, [cv2.IMWRITE_JPEG_QUALITY, 85])
            return encoded.tobytes() if ok else b""
        small_map = cv2.resize(sample.anomaly_map, size, interpolation=cv2.INTER_AREA)
        low, high = sample.map_range
        return self.overlay(small, small_map, low=low, high=high, image_format="jpeg")

    def _announce(self, sample: NewSample, sample_id: str) -> None:
        if self.publisher is None:
            return
        verdict = sample.verdict
        thumbnail = base64.b64encode(sample.thumbnail).decode("ascii")
        record = SampleRecord(
            sample_id=sample_id,
            agent_id=verdict.agent_id,
            line=verdict.line,
            camera=verdict.camera,
            seq=verdict.seq,
            camera_frame_id=verdict.camera_frame_id,
            kind=sample.kind,
            verdict=verdict.verdict,
            cause=verdict.cause,
            score=verdict.score,
            threshold=verdict.threshold,
            model=verdict.model,
            capture_ts=verdict.capture_ts,
            thumbnail_jpeg=thumbnail if len(thumbnail) <= MAX_THUMBNAIL_CHARS else "",
        )
        topic = self.topics.sample(verdict.line, verdict.agent_id, verdict.camera)
        self.publisher.publish(topic, record, qos=1)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (up to timeout_s), then stop the writer thread."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            log.warning(
                "sample writer still busy after %g s; %d queued samples are lost", timeout_s, self._queue.qsize()
            )
            return
        self._thread.join(timeout=timeout_s)
