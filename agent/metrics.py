"""Prometheus metrics of the pipeline, served by the decision process (it sees every frame's fate)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class PipelineMetrics:
    """The agent's per-frame facts; one instance per decision process, on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.verdicts = Counter(
            "lineguard_verdicts", "Verdicts published", ["camera", "verdict"], registry=self.registry
        )
        self.failsafes = Counter(
            "lineguard_failsafes", "Failsafe verdicts by cause", ["camera", "cause"], registry=self.registry
        )
        self.latency = Histogram(
            "lineguard_latency_seconds",
            "Per-stage latency: capture_to_engine, inference, engine_to_decision, total (capture to publish)",
            ["stage"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.fps = Gauge(
            "lineguard_fps", "Verdicts per second over the last status period", ["camera"], registry=self.registry
        )
        self.pending = Gauge("lineguard_pending_frames", "Frames awaiting a score", registry=self.registry)
        self.ring_occupancy = Gauge(
            "lineguard_ring_occupancy", "Shared-memory ring slots in use", ["ring"], registry=self.registry
        )
        self.mqtt_queued = Gauge(
            "lineguard_mqtt_queued", "Messages queued locally for the broker", registry=self.registry
        )
        self.failsafe_share = Gauge(
            "lineguard_failsafe_share",
            "Share of a camera's verdicts that were failsafe over the health window",
            ["camera"],
            registry=self.registry,
        )
        self.health = Gauge(
            "lineguard_health",
            "1 for the agent's current health state (ok, degraded, failing), 0 for the others",
            ["state"],
            registry=self.registry,
        )
        self.late_scores = Counter(
            "lineguard_late_scores", "Scores that arrived after their frame's failsafe", registry=self.registry
        )

    def serve(self, host: str, port: int) -> None:
        """Start the HTTP exporter; port 0 means metrics are kept but not served."""
        if port:
            start_http_server(port, addr=host, registry=self.registry)
            log.info("metrics on http://%s:%d/metrics", host, port)
