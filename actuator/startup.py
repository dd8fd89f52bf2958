"""Start-up: connect, learn each source agent's deadline from its retained status, measure the MQTT round
trip, and refuse a reject delay that cannot be met.

Every part's verdict must be here before its due point: the agent answers within its decision.deadline_ms
of capture (a failsafe at the latest), the broker adds its latency, and `margin_ms` covers the rest (the
agent's loop, this loop, clock offsets between hosts). So reject_delay_ms (time mode), or
count.distance_counts at the line's top speed count.max_counts_per_s (count mode), must be at least
deadline + round trip + margin. Messages that arrive meanwhile (verdicts of parts already on the belt) are
kept for the loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from lineguard.agent.contract import AgentStatus, ContractError, Topics, decode

from .config import ActuatorConfig, ConfigError
from .link import Event, Inbound, Inbox, MqttLink

log = logging.getLogger(__name__)


class StartupError(Exception):
    """Start-up could not finish (broker or agent not there yet): exit 1, and systemd tries again."""


@dataclass(slots=True)
class Readiness:
    deadlines: dict[str, float]
    rtt_s: float
    held: list[Event] = field(default_factory=list)  # arrived during start-up: for the loop, in order


def prepare(config: ActuatorConfig, link: MqttLink, inbox: Inbox) -> Readiness:
    """Wait for the broker and the agents' deadlines, then measure the round trip (StartupError on a timeout)."""
    timeout_s = config.startup.status_timeout_s
    if not link.connected.wait(timeout_s):
        msg = f"broker {link.where}: no connection within {timeout_s:.0f} s (mqtt.host, mqtt.port, TLS settings?)"
        raise StartupError(msg)
    topics = Topics(config.mqtt.topic_prefix)
    ready = Readiness({}, 0.0)
    wanted = {source.agent for source in config.sources}
    end = time.monotonic() + timeout_s
    while wanted - set(ready.deadlines) and time.monotonic() < end:
        for event in inbox.take(0.1):
            ready.held.append(event)
            if isinstance(event, Inbound) and (agent := _status_agent(topics, event.topic)) in wanted:
                try:
                    status = decode(AgentStatus, event.payload)
                except ContractError as error:
                    log.warning("agent %s status refused: %s", agent, error)
                    continue
                if status.deadline_ms is not None:
                    ready.deadlines[agent] = status.deadline_ms
    missing = sorted(wanted - set(ready.deadlines))
    if missing:
        msg = (
            f"no status with deadline_ms from agent(s) {', '.join(missing)} within {timeout_s:.0f} s "
            f"(startup.status_timeout_s): is the agent running, on line {config.line}, with prefix "
            f"{config.mqtt.topic_prefix!r}, and a Lineguard version that reports its deadline?"
        )
        raise StartupError(msg)
    ready.rtt_s = _round_trip_s(config, link, inbox, topics, ready.held)
    return ready


def _status_agent(topics: Topics, topic: str) -> str | None:
    match = topics.match(topic)
    return match.levels["agent"] if match is not None and match.channel.name == "status" else None


def _round_trip_s(config: ActuatorConfig, link: MqttLink, inbox: Inbox, topics: Topics, held: list[Event]) -> float:
    """The slowest of startup.probes QoS 1 round trips through the broker (publish -> our own subscription)."""
    probe_topic = topics.actuator_probe(config.actuator_id)
    slowest = 0.0
    for index in range(
        -1, config.startup.probes
    ):  # probe -1 warms up the path (first calls cost ~50 ms) and is not counted
        payload = f"{index}:{time.monotonic_ns()}".encode()
        sent = time.monotonic()
        link.publish(probe_topic, payload)
        end = sent + config.startup.status_timeout_s
        back = False
        while not back and time.monotonic() < end:
            for event in inbox.take(end - time.monotonic()):
                if isinstance(event, Inbound) and event.topic == probe_topic and event.payload == payload:
                    slowest, back = (max(slowest, event.at - sent) if index >= 0 else slowest), True
                else:
                    held.append(event)
        if not back:
            msg = f"latency probe {index} did not come back from broker {link.where} within {end - sent:.0f} s"
            raise StartupError(msg)
    return slowest


def check_budget(config: ActuatorConfig, deadlines: dict[str, float], rtt_s: float) -> None:
    """ConfigError (exit 2) naming the keys when a part's verdict cannot be here before its due point."""
    agent, deadline_ms = max(deadlines.items(), key=lambda item: item[1])
    rtt_ms = rtt_s * 1e3
    need_ms = deadline_ms + rtt_ms + config.margin_ms
    if config.mode == "time":
        have_ms, have = config.reject_delay_ms, f"reject_delay_ms = {config.reject_delay_ms:g}"
        fix = "raise reject_delay_ms (the reject point further downstream)"
    else:
        have_ms = config.count.distance_counts / config.count.max_counts_per_s * 1e3
        have = (
            f"count.distance_counts = {config.count.distance_counts} at count.max_counts_per_s = "
            f"{config.count.max_counts_per_s:g} ({have_ms:.1f} ms at top speed)"
        )
        fix = "raise count.distance_counts, or check count.max_counts_per_s"
    if have_ms < need_ms:
        msg = (
            f"{have} cannot be met: agent {agent}'s decision.deadline_ms {deadline_ms:g} + measured MQTT round trip "
            f"{rtt_ms:.1f} ms + margin_ms {config.margin_ms:g} = {need_ms:.1f} ms; {fix}, or lower the agent's "
            "decision.deadline_ms"
        )
        raise ConfigError(msg)
    log.info(
        "timing budget: %.1f ms available >= deadline %.0f ms (agent %s) + round trip %.1f ms + margin %.0f ms",
        have_ms,
        deadline_ms,
        agent,
        rtt_ms,
        config.margin_ms,
    )
