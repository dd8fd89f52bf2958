"""The actuator loop: receive (verdicts, statuses, connection), act (parts due now, output edges), send (status).

One thread owns the part table and the output; paho's thread only fills the inbox. The loop sleeps until
the earliest of: the next part's due point, the output's next edge, the next status or health check, or a
new message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from lineguard.agent.contract import (
    ActuatorStatus,
    AgentStatus,
    ContractError,
    RejectReason,
    TopicMatch,
    Topics,
    Verdict,
    decode,
)
from lineguard.agent.sdnotify import SystemdNotifier

from .config import ActuatorConfig
from .health import Health
from .link import Connection, Event, Inbound, Inbox, MqttLink
from .metrics import ActuatorMetrics
from .outputs import Output, OutputEvent, OutputFault, PartRef
from .parts import Arrival, Part, PartTable, judge
from .schedule import CountSchedule, Schedule, TimeSchedule
from .status import Counts, status_record

log = logging.getLogger(__name__)

STATUS_PERIOD_S = 2.0
HEALTH_PERIOD_S = 0.1
LOG_EVERY_S = 10.0


class RateLimitedLog:
    """At most one WARNING per kind every LOG_EVERY_S, with how many happened since the last one."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def warn(self, kind: str, message: str, now: float) -> None:
        self._since[kind] = self._since.get(kind, 0) + 1
        if now - self._last.get(kind, float("-inf")) >= LOG_EVERY_S:
            log.warning("%s (%d such since the last report)", message, self._since.pop(kind))
            self._last[kind] = now


class Actuator:
    """Everything the loop owns. `deadlines`: each source agent's decision.deadline_ms (from its status)."""

    def __init__(
        self,
        config: ActuatorConfig,
        output: Output,
        link: MqttLink,
        inbox: Inbox,
        *,
        deadlines: dict[str, float],
        counter: CounterReader | None = None,
    ) -> None:
        self.config, self.output, self.link, self.inbox = config, output, link, inbox
        self.topics = Topics(config.mqtt.topic_prefix)
        self.sources = {source.agent: source for source in config.sources}
        self.deadlines = dict(deadlines)
        self.schedule: Schedule = (
            TimeSchedule(config.reject_delay_ms / 1e3)
            if config.mode == "time"
            else CountSchedule(config.count.distance_counts, config.count.poll_ms / 1e3)
        )
        self.counter = counter
        self.table = PartTable()
        self.health = Health(tuple(self.sources), config.fault.agent_silent_s, config.fault.hold_s)
        self.health.broker_up = link.connected.is_set()
        self.counts = Counts()
        self.metrics = ActuatorMetrics()
        self.notifier = SystemdNotifier()
        self.warnings = RateLimitedLog()
        self.state, self.reason = "ok", ""
        self._fault_action: str | None = "unset"
        self._next_status = self._next_watchdog = self._next_health = 0.0

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, first: Iterable[Event] = ()) -> None:
        self.metrics.serve(self.config.metrics.host, self.config.metrics.port)
        for event in first:
            self._handle(event)
        self.notifier.notify("READY=1")
        log.info(
            "actuator %s ready: %s mode, output %s, sources %s",
            self.config.actuator_id,
            self.config.mode,
            self.output.kind,
            ", ".join(f"{agent} {list(source.cameras)}" for agent, source in self.sources.items()),
        )
        while not stop.is_set():
            self.step()
        self.notifier.notify("STOPPING=1")

    def step(self) -> None:
        now = time.monotonic()
        for event in self.inbox.take(self._wake_at(now) - now):
            self._handle(event)
        now = time.monotonic()
        if self.counter is not None:
            self._read_counter(now)
        self._fire_due(now)
        self.output.poll(now)
        for done in self.output.drain_events():
            self._on_output_event(done, now)
        if now >= self._next_health:
            self._apply_health(now)
        self._periodic(now)

    def _wake_at(self, now: float) -> float:
        times = [self._next_status, self._next_health, self._next_watchdog]
        due = self.table.next_due()
        if due is not None:
            times.append(self.schedule.wake_at(due, now))
        if self.counter is not None:
            times.append(now + self.config.count.poll_ms / 1e3)
        output_at = self.output.next_event(now)
        if output_at is not None:
            times.append(output_at)
        return min(times)

    # -- receive ---------------------------------------------------------------------------------------------

    def _handle(self, event: Event) -> None:
        if isinstance(event, Connection):
            self.health.broker_up = event.connected
            log.log(
                logging.INFO if event.connected else logging.ERROR,
                "broker %s: %s (%s)",
                self.link.where,
                "connected" if event.connected else "connection lost",
                event.detail,
            )
            self._next_health = 0.0
            return
        match = self.topics.match(event.topic)
        if match is None or match.channel.name not in ("verdict", "status", "actuator_probe"):
            self._bad("other-topic", f"message on {event.topic[:200]} is not for an actuator", event.at)
        elif match.channel.name == "verdict":
            self._on_verdict(event, match)
        elif match.channel.name == "status":
            self._on_agent_status(event, match)

    def _bad(self, kind: str, message: str, now: float) -> None:
        self.counts.bad_input += 1
        self.metrics.bad_input.labels(kind).inc()
        self.warnings.warn(kind, f"refused: {message}", now)

    def _on_verdict(self, event: Inbound, match: TopicMatch) -> None:
        if event.retained:
            self._bad("retained", f"retained verdict on {event.topic} (verdicts are never retained)", event.at)
            return
        try:
            verdict = decode(Verdict, event.payload)
        except ContractError as error:
            self._bad("not-contract", f"{event.topic}: {error}", event.at)
            return
        levels = match.levels
        if (verdict.line, verdict.agent_id, verdict.camera) != (levels["line"], levels["agent"], levels["camera"]):
            self._bad("mismatch", f"verdict on {event.topic} names {verdict.agent_id}/{verdict.camera}", event.at)
            return
        source = self.sources.get(verdict.agent_id)
        if source is None or verdict.camera not in source.cameras:
            self._bad(
                "unknown-source", f"verdicts of {verdict.agent_id}/{verdict.camera} are not for this gate", event.at
            )
            return
        reason = judge(verdict, models=source.models, deadline_ms=self.deadlines.get(verdict.agent_id))
        now = time.monotonic()
        arrival = self.table.add(verdict, reason, due_of=self.schedule.due_of, position=self.schedule.position(now))
        self._on_arrival(verdict, arrival, now)

    def _on_arrival(self, verdict: Verdict, arrival: Arrival, now: float) -> None:
        where = f"{verdict.agent_id}/{verdict.camera}"
        if arrival.kind in ("duplicate", "replay"):
            self._bad(arrival.kind, f"{where} seq {verdict.seq} seen before (QoS 1 redelivery or replay)", now)
        elif arrival.kind == "late":
            self.counts.late_verdicts += 1
            self.metrics.late_verdicts.inc()
            self.warnings.warn("late", f"{where} seq {verdict.seq}: verdict arrived after its part's due point", now)
        if arrival.gap_parts:
            self.warnings.warn(
                "gap",
                f"{where}: sequence gap before seq {verdict.seq}, "
                f"{len(arrival.gap_parts)} parts rejected at their due point unless their verdicts come",
                now,
            )
        if arrival.unguarded:
            self.counts.unguarded += arrival.unguarded
            self.metrics.unguarded.inc(arrival.unguarded)
            why = f"{arrival.unguarded} part(s) of {where} before seq {verdict.seq} went by with no decision"
            log.error("%s: vision-fault alarm for %.0f s", why, self.config.fault.hold_s)
            self.health.alarm(why, now)
            self._next_health = 0.0
        part = arrival.part
        if part is not None and part.reason is not None and isinstance(self.schedule, TimeSchedule):
            self.output.reject(PartRef(part.key, part.reason, part.due), now)  # planned now: pulses can merge
            part.planned = True

    def _on_agent_status(self, event: Inbound, match: TopicMatch) -> None:
        agent = match.levels["agent"]
        if agent not in self.sources:
            return  # other agents' statuses are not ours to judge
        try:
            status = decode(AgentStatus, event.payload)
        except ContractError as error:
            self._bad("not-contract", f"{event.topic}: {error}", event.at)
            return
        age_s = max(time.time() - status.ts, 0.0)  # a retained status may be old
        self.health.agent_status(agent, online=status.online, now=event.at - age_s)
        if status.deadline_ms is not None:
            self.deadlines[agent] = status.deadline_ms
        self._next_health = 0.0

    # -- act -------------------------------------------------------------------------------------------------

    def _read_counter(self, now: float) -> None:
        assert self.counter is not None and isinstance(self.schedule, CountSchedule)
        try:
            self.schedule.observe(now, self.counter.read())
        except OutputFault as error:
            self.health.alarm(f"line counter unreadable: {error}", now)

    def _fire_due(self, now: float) -> None:
        position = self.schedule.position(now)
        for part in self.table.pop_due(position):
            self._due(part, now)

    def _due(self, part: Part, now: float) -> None:
        self.counts.parts += 1
        self.metrics.parts.inc()
        reason: RejectReason | None = part.reason
        if reason is None and self._fault_action == "reject-all":
            reason = "vision-fault"
        due = self.schedule.time_of(part.due) or now
        if reason is None:
            self.output.accept(PartRef(part.key, None, due), now)
            return
        self.counts.rejects[reason] = self.counts.rejects.get(reason, 0) + 1
        self.metrics.rejects.labels(reason).inc()
        if not part.planned:
            self.output.reject(PartRef(part.key, reason, due), now)

    def _on_output_event(self, event: OutputEvent, now: float) -> None:
        if event.kind == "pulse":
            self.counts.pulses += 1
            self.metrics.pulses.inc()
            self.metrics.pulse_error.observe(max(event.at - event.due, 0.0))
            log.debug(
                "pulse for %s: due %.4f, on at %.4f (%+.1f ms)",
                event.parts,
                event.due,
                event.at,
                (event.at - event.due) * 1e3,
            )
        elif event.kind == "late":
            self.counts.late_pulses += len(event.parts)
            self.metrics.late_pulses.inc(len(event.parts))
            why = f"reject of {event.parts[0]} not fired: {event.detail}"
            log.error("%s (%+.1f ms past due); vision-fault alarm", why, (event.at - event.due) * 1e3)
            self.health.alarm(why, now)
            self._next_health = 0.0
        elif event.kind == "handshake-failed":
            self.counts.handshake_failures += 1
            self.metrics.handshake_failures.inc()
            self.warnings.warn("handshake", f"{self.output.kind}: {event.detail}", now)

    def _apply_health(self, now: float) -> None:
        self._next_health = now + HEALTH_PERIOD_S
        state, reason = self.health.state(now, self.output.problem)
        action = self.config.fault.action if state == "vision-fault" else None
        if action != self._fault_action:
            self.output.set_fault(action, now)
            self._fault_action = action
        if (state, reason) != (self.state, self.reason):
            level = logging.INFO if state == "ok" else logging.ERROR
            log.log(level, "state %s%s", state, f": {reason}; fault action {action}" if reason else "")
            self.state, self.reason = state, reason
            self.metrics.fault.set(0 if state == "ok" else 1)
            self._next_status = 0.0

    # -- send ------------------------------------------------------------------------------------------------

    def _periodic(self, now: float) -> None:
        if now >= self._next_status:
            self._next_status = now + STATUS_PERIOD_S
            self.link.publish(
                self.topics.actuator_status(self.config.actuator_id), self.status(online=True).encode(), retain=True
            )
        interval = self.notifier.watchdog_interval_s
        if interval is not None and now >= self._next_watchdog:
            self.notifier.notify("WATCHDOG=1")
            self._next_watchdog = now + interval
        elif interval is None:
            self._next_watchdog = now + 3600.0

    def status(self, *, online: bool, reason: str = "") -> ActuatorStatus:
        return status_record(
            self.config,
            self.counts,
            online=online,
            state=self.state if online else "stopped",
            reason=reason or self.reason,
            agents=self.health.online(time.monotonic()),
        )


class CounterReader:
    """Count mode: the 32-bit line counter (low word first) from a Modbus holding register pair."""

    def __init__(self, config: ActuatorConfig) -> None:
        from .outputs.modbus import ModbusLink

        self.link = ModbusLink(config.modbus)
        self.register = config.count.counter_register

    def read(self) -> int:
        low, high = self.link.read_registers(self.register, 2)
        return low | (high << 16)

    def close(self) -> None:
        self.link.close()
