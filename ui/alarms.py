"""Alarm rules (pure: facts in, conditions out) and the alarm lifecycle every alarm follows until acknowledged.

A *condition* is something wrong right now (an agent offline, a camera without verdicts) or an event that
happened once (a model swap refused). An *alarm* is the record an operator sees: raised when its condition
appears, still shown after the condition ends ("returned to normal") until someone acknowledges it, and
still shown after an acknowledgement while the condition lasts. An acknowledged alarm whose condition has
ended is closed; if the condition comes back, a new alarm is raised (ISA-18.2's states, without shelving).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from lineguard.agent.contract import ActuatorStatus, ModelEvent

from .config import AlarmConfig

AlarmKind = Literal[
    "agent-offline",
    "camera-down",
    "failsafe-burst",
    "mqtt-queue",
    "swap-refused",
    "actuator-handshake",
    "actuator-fault",
]
Severity = Literal["critical", "warning"]


@dataclass(frozen=True, slots=True)
class Condition:
    """Something wrong: `key` names its source (one alarm per key at a time), `subject` the agent or actuator."""

    key: str
    kind: AlarmKind
    line: str
    subject: str
    camera: str
    severity: Severity
    message: str


@dataclass(frozen=True, slots=True)
class AgentFacts:
    """What the broker said about one agent. Ages in seconds; queued: mqtt_queued of its last statuses, oldest first."""

    agent_id: str
    line: str
    online: bool
    reason: str
    status_age_s: float
    queued: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CameraFacts:
    """One camera of an agent: seconds since its last verdict, failsafe verdicts within the burst window."""

    agent_id: str
    line: str
    camera: str
    verdict_age_s: float
    failsafes_in_window: int


@dataclass(frozen=True, slots=True)
class Facts:
    agents: tuple[AgentFacts, ...] = ()
    cameras: tuple[CameraFacts, ...] = ()
    actuators: tuple[ActuatorStatus, ...] = ()


def agent_offline(agent: AgentFacts, config: AlarmConfig) -> Condition | None:
    """Offline by its status (the last will: 'connection lost'; a clean stop: 'stopped'), or silent too long."""
    if agent.online and agent.status_age_s <= config.status_silence_s:
        return None
    if not agent.online:
        how = "its last will: connection lost" if agent.reason == "connection lost" else agent.reason or "offline"
        message = f"agent {agent.agent_id} is offline ({how}): its cameras are not inspected"
    else:
        message = (
            f"agent {agent.agent_id} sent no status for over {config.status_silence_s:.0f} s (hung, or its broker link)"
        )
    return Condition(
        f"agent-offline:{agent.agent_id}", "agent-offline", agent.line, agent.agent_id, "", "critical", message
    )


def camera_down(camera: CameraFacts, config: AlarmConfig) -> Condition | None:
    """A camera of an online agent without a verdict for camera_silence_s."""
    if camera.verdict_age_s <= config.camera_silence_s:
        return None
    message = f"camera {camera.camera} of {camera.agent_id}: no verdict for over {config.camera_silence_s:.0f} s"
    key = f"camera-down:{camera.agent_id}/{camera.camera}"
    return Condition(key, "camera-down", camera.line, camera.agent_id, camera.camera, "critical", message)


def failsafe_burst(camera: CameraFacts, config: AlarmConfig) -> Condition | None:
    """failsafe_burst or more failsafe verdicts of one camera within failsafe_window_s."""
    if camera.failsafes_in_window < config.failsafe_burst:
        return None
    message = (
        f"camera {camera.camera} of {camera.agent_id}: {config.failsafe_burst} or more failsafe verdicts "
        f"within {config.failsafe_window_s:.0f} s (engine late or down, capture failing?)"
    )
    key = f"failsafe-burst:{camera.agent_id}/{camera.camera}"
    return Condition(key, "failsafe-burst", camera.line, camera.agent_id, camera.camera, "critical", message)


def mqtt_queue(agent: AgentFacts, config: AlarmConfig) -> Condition | None:
    """The agent's MQTT queue rises over queue_growing_samples statuses past queue_min_messages, or is too long."""
    if not agent.online or not agent.queued:
        return None
    last = agent.queued[-1]
    recent = agent.queued[-config.queue_growing_samples :]
    rising = len(recent) == config.queue_growing_samples and all(a < b for a, b in itertools.pairwise(recent))
    if last >= config.queue_max_messages:
        message = f"agent {agent.agent_id} holds {config.queue_max_messages} or more messages for the broker"
    elif rising and last >= config.queue_min_messages:
        message = (
            f"agent {agent.agent_id}: MQTT queue growing over {config.queue_growing_samples} statuses, "
            f"past {config.queue_min_messages} messages (broker slow or unreachable?)"
        )
    else:
        return None
    return Condition(f"mqtt-queue:{agent.agent_id}", "mqtt-queue", agent.line, agent.agent_id, "", "warning", message)


def actuator_fault(actuator: ActuatorStatus) -> Condition | None:
    """An actuator offline or in a state other than ok (vision-fault, output-fault, stopped)."""
    if actuator.online and actuator.state == "ok":
        return None
    what = "offline" if not actuator.online else actuator.state
    message = f"actuator {actuator.actuator_id} {what}" + (f": {actuator.reason}" if actuator.reason else "")
    key = f"actuator-fault:{actuator.actuator_id}"
    return Condition(key, "actuator-fault", actuator.line, actuator.actuator_id, "", "critical", message)


def evaluate(facts: Facts, config: AlarmConfig) -> list[Condition]:
    """Every condition that holds now. Cameras of an offline or silent agent are covered by its own alarm."""
    found: list[Condition] = []
    down_agents = set()
    for agent in facts.agents:
        offline = agent_offline(agent, config)
        if offline is not None:
            down_agents.add(agent.agent_id)
        found += [each for each in (offline, mqtt_queue(agent, config)) if each is not None]
    for camera in facts.cameras:
        if camera.agent_id not in down_agents:
            found += [each for each in (camera_down(camera, config), failsafe_burst(camera, config)) if each]
    found += [each for each in map(actuator_fault, facts.actuators) if each is not None]
    return found


def swap_refused(event: ModelEvent, line: str) -> Condition | None:
    """A push or rollback the agent refused: an event, raised once and kept until acknowledged."""
    if event.outcome != "refused":
        return None
    model = f" of {event.model}" if event.model else ""
    message = f"agent {event.agent_id} refused the {event.action}{model}: {event.reason}"
    key = f"swap-refused:{event.agent_id}:{event.request_id}"
    return Condition(key, "swap-refused", line, event.agent_id, "", "warning", message)


def handshake_failures(previous: ActuatorStatus | None, current: ActuatorStatus) -> Condition | None:
    """New PLC handshake failures since the actuator's previous status (or since its start, seen first)."""
    before = previous.handshake_failures if previous is not None else 0
    if current.handshake_failures <= before:
        return None
    message = (
        f"actuator {current.actuator_id}: {current.handshake_failures - before} PLC handshake(s) not echoed in time "
        f"({current.handshake_failures} since it started)"
    )
    key = f"actuator-handshake:{current.actuator_id}"
    return Condition(key, "actuator-handshake", current.line, current.actuator_id, "", "critical", message)


# -- the lifecycle ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alarm:
    """One alarm as operators see it. Times are Unix seconds; `active`: its condition holds now."""

    alarm_id: int
    key: str
    kind: AlarmKind
    line: str
    subject: str
    camera: str
    severity: Severity
    message: str
    raised_ts: float
    active: bool
    cleared_ts: float | None = None
    acked_by: str = ""
    acked_ts: float | None = None
    count: int = 1

    @property
    def closed(self) -> bool:
        """Acknowledged and no longer active: no longer shown."""
        return self.acked_ts is not None and not self.active


class AlarmBook:
    """The open alarms and their transitions. Each method returns the alarms it changed.

    Thread-safe: rules run on the feed's threads, acknowledgements on the web server's. `persist` is called
    with every changed alarm while the book's lock is held, so what is on disk follows the same order.
    """

    def __init__(self, open_alarms: Iterable[Alarm], next_id: int, persist: Callable[[Alarm], None]) -> None:
        self._lock = threading.Lock()
        self._open = {alarm.key: alarm for alarm in open_alarms if not alarm.closed}
        self._next_id = max([next_id, *(alarm.alarm_id + 1 for alarm in self._open.values())])
        self._persist = persist

    def open_alarms(self) -> list[Alarm]:
        """Every alarm still shown, newest first."""
        with self._lock:
            return sorted(self._open.values(), key=lambda alarm: alarm.raised_ts, reverse=True)

    def sync(self, conditions: Sequence[Condition], subjects: set[str], now: float) -> list[Alarm]:
        """Raise or refresh an alarm per condition; those of `subjects` whose condition is gone return to normal.

        subjects: agents and actuators the caller has facts about; alarms of others stay as they are (at
        start-up, before the broker's retained statuses arrive, nothing returns to normal by mistake).
        """
        changed = [self._raise(each, now, active=True) for each in conditions]
        holding = {each.key for each in conditions}
        with self._lock:
            ended = [
                alarm
                for alarm in self._open.values()
                if alarm.active and alarm.subject in subjects and alarm.key not in holding
            ]
        for alarm in ended:
            changed.append(self._store(replace(alarm, active=False, cleared_ts=now)))
        return [alarm for alarm in changed if alarm is not None]

    def event(self, condition: Condition, now: float) -> Alarm | None:
        """An event alarm (raised and over at once), or a repeat counted on the one not yet acknowledged."""
        return self._raise(condition, now, active=False)

    def acknowledge(self, alarm_id: int, user: str, now: float) -> Alarm | None:
        """Record who acknowledged it and when; None if no open alarm has that id (or it is acknowledged)."""
        with self._lock:
            alarm = next((each for each in self._open.values() if each.alarm_id == alarm_id), None)
        if alarm is None or alarm.acked_ts is not None:
            return None
        return self._store(replace(alarm, acked_by=user, acked_ts=now))

    def _raise(self, condition: Condition, now: float, *, active: bool) -> Alarm | None:
        """The new or updated alarm; None when the condition changes nothing (still active, same message)."""
        with self._lock:
            existing = self._open.get(condition.key)
            if existing is not None and (active or existing.acked_ts is None):
                if active and existing.active and existing.message == condition.message:
                    return None
                count = existing.count + (0 if active and existing.active else 1)
                cleared = None if active else now
                updated = replace(existing, active=active, message=condition.message, cleared_ts=cleared, count=count)
                return self._store_locked(updated)
            alarm = Alarm(
                alarm_id=self._next_id,
                key=condition.key,
                kind=condition.kind,
                line=condition.line,
                subject=condition.subject,
                camera=condition.camera,
                severity=condition.severity,
                message=condition.message,
                raised_ts=now,
                active=active,
                cleared_ts=None if active else now,
            )
            self._next_id += 1
            return self._store_locked(alarm)

    def _store(self, alarm: Alarm) -> Alarm:
        with self._lock:
            return self._store_locked(alarm)

    def _store_locked(self, alarm: Alarm) -> Alarm:
        self._persist(alarm)
        if alarm.closed:
            self._open.pop(alarm.key, None)
        else:
            self._open[alarm.key] = alarm
        return alarm
