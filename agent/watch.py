"""`lineguard-agent watch`: follow an agent's verdicts on the broker, one line each, then a summary.

For line engineers at the broker's side: what is the agent deciding, how fast, and why.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from .config import AgentConfig
from .mqtt import topics


@dataclass
class WatchSummary:
    """Counts and capture-to-publish latencies of the verdicts seen."""

    counts: dict[str, int] = field(default_factory=lambda: {"accept": 0, "reject": 0, "failsafe": 0})
    latencies_ms: list[float] = field(default_factory=list)
    seqs: set[int] = field(default_factory=set)

    def add(self, verdict: dict[str, Any]) -> None:
        self.counts[verdict["verdict"]] = self.counts.get(verdict["verdict"], 0) + 1
        self.seqs.add(int(verdict["seq"]))
        if verdict["verdict"] != "failsafe":
            self.latencies_ms.append(float(verdict["latency_ms"]["total"]))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def text(self) -> str:
        missing = (max(self.seqs) - min(self.seqs) + 1 - len(self.seqs)) if self.seqs else 0
        p50, p99 = np.percentile(self.latencies_ms, [50, 99]) if self.latencies_ms else (float("nan"),) * 2
        return (
            f"{self.total} frames: {self.counts['accept']} accepted, {self.counts['reject']} rejected, "
            f"{self.counts['failsafe']} failsafe; {missing} sequence gaps; "
            f"capture-to-publish latency p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        )


def _line(verdict: dict[str, Any]) -> str:
    score = "—" if verdict["score"] is None else f"{verdict['score']:.2f}"
    return (
        f"{verdict['camera']:>8} seq {verdict['seq']:>6}  {verdict['verdict'].upper():<8} score {score:>7} "
        f"/ {verdict['threshold']:.2f}  {verdict['latency_ms']['total']:6.1f} ms  {verdict['reason']}"
    )


def watch(config: AgentConfig, *, count: int, timeout_s: float, out: TextIO = sys.stdout) -> WatchSummary:
    """Print verdicts of every camera of this agent until `count` arrived or `timeout_s` passed."""
    summary = WatchSummary()
    done = threading.Event()
    agent_topics = topics(config.mqtt.topic_prefix, config.line, config.agent_id)
    wanted = {agent_topics.verdict(camera.name) for camera in config.cameras}

    def on_message(_client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.topic in wanted:
            verdict = json.loads(message.payload)
            summary.add(verdict)
            print(_line(verdict), file=out, flush=True)
            if summary.total >= count:
                done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    if config.mqtt.username:
        client.username_pw_set(config.mqtt.username, config.mqtt.password)
    if config.mqtt.tls_ca is not None:
        certfile = str(config.mqtt.tls_cert) if config.mqtt.tls_cert else None
        keyfile = str(config.mqtt.tls_key) if config.mqtt.tls_key else None
        client.tls_set(ca_certs=str(config.mqtt.tls_ca), certfile=certfile, keyfile=keyfile)

    def on_connect(client: mqtt.Client, *_: object) -> None:
        for topic in sorted(wanted):
            client.subscribe(topic, qos=1)

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(config.mqtt.host, config.mqtt.port)
    client.loop_start()
    try:
        done.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
    print(summary.text(), file=out, flush=True)
    return summary
