"""Prometheus metrics of the reject actuator, on their own registry."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_TIMING_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


class ActuatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.parts = Counter("lineguard_actuator_parts", "Parts that reached the reject point", registry=r)
        self.rejects = Counter("lineguard_actuator_rejects", "Rejected parts by reason", ["reason"], registry=r)
        self.pulses = Counter("lineguard_actuator_pulses", "Reject pulses or results fired", registry=r)
        self.late_pulses = Counter(
            "lineguard_actuator_late_pulses", "Rejects not fired: their due point had passed", registry=r
        )
        self.late_verdicts = Counter(
            "lineguard_actuator_late_verdicts", "Verdicts that arrived after their part's due point", registry=r
        )
        self.unguarded = Counter(
            "lineguard_actuator_unguarded_parts", "Parts gone by before anything was known of them", registry=r
        )
        self.bad_input = Counter("lineguard_actuator_bad_input", "Messages refused, by kind", ["kind"], registry=r)
        self.handshake_failures = Counter(
            "lineguard_actuator_handshake_failures", "PLC handshakes not echoed in time", registry=r
        )
        self.pulse_error = Histogram(
            "lineguard_actuator_pulse_error_seconds",
            "Output start minus due point",
            buckets=_TIMING_BUCKETS_S,
            registry=r,
        )
        self.fault = Gauge("lineguard_actuator_fault", "1 while a vision or output fault stands", registry=r)
        self.mqtt_rtt = Gauge("lineguard_actuator_mqtt_rtt_seconds", "Slowest start-up MQTT round trip", registry=r)

    def serve(self, host: str, port: int) -> None:
        if port:
            start_http_server(port, addr=host, registry=self.registry)
            log.info("metrics on http://%s:%d/metrics", host, port)
