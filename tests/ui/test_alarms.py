"""Alarm rules (pure facts -> conditions) and the lifecycle every alarm follows until it is acknowledged."""

from __future__ import annotations

import pytest

from lineguard.agent.contract import ActuatorStatus, ModelEvent
from lineguard.ui.alarms import (
    AgentFacts,
    Alarm,
    AlarmBook,
    CameraFacts,
    Facts,
    evaluate,
    handshake_failures,
    swap_refused,
)
from lineguard.ui.config import AlarmConfig

CONFIG = AlarmConfig()


def agent(**changes: object) -> AgentFacts:
    values = {
        "agent_id": "press-3",
        "line": "line-1",
        "online": True,
        "reason": "",
        "status_age_s": 1.0,
        "queued": (0,),
    }
    return AgentFacts(**{**values, **changes})  # type: ignore[arg-type]


def camera(**changes: object) -> CameraFacts:
    values = {"agent_id": "press-3", "line": "line-1", "camera": "top", "verdict_age_s": 0.1, "failsafes_in_window": 0}
    return CameraFacts(**{**values, **changes})  # type: ignore[arg-type]


def kinds(facts: Facts) -> list[str]:
    return sorted(condition.kind for condition in evaluate(facts, CONFIG))


def test_a_healthy_line_raises_nothing():
    assert kinds(Facts((agent(),), (camera(),))) == []


def test_the_last_will_makes_an_agent_offline_alarm_that_names_it():
    (condition,) = evaluate(Facts((agent(online=False, reason="connection lost"),), (camera(),)), CONFIG)
    assert condition.kind == "agent-offline" and condition.severity == "critical"
    assert "press-3" in condition.message and "last will" in condition.message


def test_an_online_agent_whose_status_stopped_coming_is_offline_too():
    assert kinds(Facts((agent(status_age_s=CONFIG.status_silence_s + 1),))) == ["agent-offline"]


def test_a_camera_without_verdicts_is_down_but_not_when_its_agent_is_already_offline():
    silent = camera(verdict_age_s=CONFIG.camera_silence_s + 1)
    assert kinds(Facts((agent(),), (silent,))) == ["camera-down"]
    assert kinds(Facts((agent(online=False),), (silent,))) == ["agent-offline"]


def test_a_failsafe_burst_is_counted_within_its_window():
    assert kinds(Facts((agent(),), (camera(failsafes_in_window=CONFIG.failsafe_burst - 1),))) == []
    assert kinds(Facts((agent(),), (camera(failsafes_in_window=CONFIG.failsafe_burst),))) == ["failsafe-burst"]


@pytest.mark.parametrize(
    ("queued", "alarm"),
    [
        ((10, 20, 30), False),  # rising, but below queue_min_messages
        ((60, 70, 80), True),  # rising past the floor
        ((80, 70, 90), False),  # not rising every time
        ((5000,), True),  # too long, rising or not
    ],
)
def test_a_growing_or_long_mqtt_queue_raises_a_warning(queued, alarm):
    found = evaluate(Facts((agent(queued=queued),)), CONFIG)
    assert [c.kind for c in found] == (["mqtt-queue"] if alarm else [])
    assert all(c.severity == "warning" for c in found)


def actuator(**changes: object) -> ActuatorStatus:
    values = {"actuator_id": "gate-1", "line": "line-1", "online": True, "ts": 1.0}
    return ActuatorStatus(**{**values, **changes})  # type: ignore[arg-type]


def test_an_actuator_offline_or_faulted_is_an_alarm_and_new_handshake_failures_are_an_event():
    assert kinds(Facts(actuators=(actuator(),))) == []
    assert kinds(Facts(actuators=(actuator(online=False),))) == ["actuator-fault"]
    assert kinds(Facts(actuators=(actuator(state="output-fault", reason="coil write timed out"),))) == [
        "actuator-fault"
    ]
    assert handshake_failures(actuator(handshake_failures=2), actuator(handshake_failures=2)) is None
    event = handshake_failures(actuator(handshake_failures=2), actuator(handshake_failures=5))
    assert event is not None and "3 PLC handshake(s)" in event.message


def test_a_refused_push_is_an_event_alarm_an_accepted_one_is_not():
    base = {"agent_id": "press-3", "action": "push", "request_id": "r1", "reason": "bad signature", "ts": 1.0}
    assert swap_refused(ModelEvent(outcome="accepted", **base), "line-1") is None  # type: ignore[arg-type]
    condition = swap_refused(ModelEvent(outcome="refused", model="brick@2.0.0", **base), "line-1")  # type: ignore[arg-type]
    assert condition is not None and "refused the push of brick@2.0.0: bad signature" in condition.message


class Book:
    """An AlarmBook with its persisted alarms kept in a list, as the store would."""

    def __init__(self, open_alarms: list[Alarm] | None = None) -> None:
        self.saved: list[Alarm] = []
        self.book = AlarmBook(open_alarms or [], 1, self.saved.append)


OFFLINE = Facts((agent(online=False, reason="connection lost"),))
BACK = Facts((agent(),))


def sync(holder: Book, facts: Facts, now: float) -> list[Alarm]:
    return holder.book.sync(evaluate(facts, CONFIG), {"press-3"}, now)


def test_an_alarm_stays_after_its_condition_ends_until_acknowledged():
    holder = Book()
    (raised,) = sync(holder, OFFLINE, 10.0)
    assert raised.active and raised.acked_ts is None
    assert sync(holder, OFFLINE, 11.0) == []  # nothing new: nothing written
    (ended,) = sync(holder, BACK, 12.0)
    assert not ended.active and ended.cleared_ts == 12.0
    assert [a.alarm_id for a in holder.book.open_alarms()] == [raised.alarm_id]  # still shown
    acked = holder.book.acknowledge(raised.alarm_id, "anna", 13.0)
    assert acked is not None and acked.closed and (acked.acked_by, acked.acked_ts) == ("anna", 13.0)
    assert holder.book.open_alarms() == []
    assert holder.saved[-1] == acked  # what is on disk follows every change


def test_an_alarm_acknowledged_while_active_stays_until_its_condition_ends():
    holder = Book()
    (raised,) = sync(holder, OFFLINE, 10.0)
    holder.book.acknowledge(raised.alarm_id, "anna", 11.0)
    assert holder.book.open_alarms()[0].acked_by == "anna"
    assert holder.book.acknowledge(raised.alarm_id, "ben", 12.0) is None  # once
    sync(holder, BACK, 13.0)
    assert holder.book.open_alarms() == []
    (again,) = sync(holder, OFFLINE, 14.0)  # the condition comes back: a new alarm
    assert again.alarm_id != raised.alarm_id and again.acked_ts is None


def test_alarms_of_agents_not_heard_from_yet_do_not_return_to_normal():
    holder = Book()
    (raised,) = sync(holder, OFFLINE, 10.0)
    restarted = Book(holder.book.open_alarms())  # a dashboard restart: no facts about press-3 yet
    assert restarted.book.sync([], set(), 20.0) == []
    assert restarted.book.open_alarms() == [raised]


def test_a_repeated_event_is_counted_on_the_unacknowledged_alarm():
    holder = Book()
    base = {"agent_id": "press-3", "action": "push", "request_id": "r1", "outcome": "refused", "reason": "x", "ts": 1.0}
    condition = swap_refused(ModelEvent(**base), "line-1")  # type: ignore[arg-type]
    assert condition is not None
    first = holder.book.event(condition, 10.0)
    second = holder.book.event(condition, 11.0)
    assert first is not None and second is not None
    assert second.alarm_id == first.alarm_id and second.count == 2 and not second.active
