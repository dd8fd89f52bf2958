"""The part table, the schedules, the pulse planner and health: pure logic with an injected clock."""

from __future__ import annotations

import pytest

from lineguard.actuator.config import PulseConfig
from lineguard.actuator.health import Health
from lineguard.actuator.outputs.base import PartRef
from lineguard.actuator.outputs.pulse import PulseOutput, Signal
from lineguard.actuator.parts import PartTable, judge
from lineguard.actuator.schedule import CountSchedule, TimeSchedule
from lineguard.agent.contract import Latency, Verdict

DELAY_S = 1.0
SCHEDULE = TimeSchedule(DELAY_S, offset=lambda: 0.0)  # wall clock == monotonic clock in these tests


def verdict(seq: int, kind: str = "accept", *, t: float | None = None, camera: str = "top", **changes) -> Verdict:
    capture = 100.0 + seq * 0.1 if t is None else t
    values = dict(
        agent_id="press-3",
        line="line-1",
        camera=camera,
        seq=seq,
        capture_ts=capture,
        decided_ts=capture + 0.05,
        verdict=kind,
        cause="engine-late" if kind == "failsafe" else None,
        reason="",
        score=None,
        threshold=0.5,
        model="brick@1.0.0",
        latency_ms=Latency(total=50.0),
    )
    values.update(changes)
    return Verdict(**values)


def add(table: PartTable, v: Verdict, now: float):
    reason = judge(v, models=(), deadline_ms=None)
    return table.add(v, reason, due_of=SCHEDULE.due_of, position=now)


@pytest.mark.parametrize(
    ("kind", "changes", "reason"),
    [
        ("accept", {}, None),
        ("reject", {}, "reject"),
        ("failsafe", {}, "failsafe"),
        ("accept", {"model": "other@1.0.0"}, "unknown-model"),
        ("accept", {"decided_ts": 100.1 + 0.3}, "late"),
    ],
)
def test_only_a_trusted_in_time_accept_passes(kind, changes, reason):
    v = verdict(1, kind, **changes)
    assert judge(v, models=("brick",), deadline_ms=250) == reason


def test_a_trusted_model_may_be_named_with_or_without_its_version():
    assert judge(verdict(1), models=("brick@1.0.0",), deadline_ms=None) is None
    assert judge(verdict(1), models=("brick@2.0.0",), deadline_ms=None) == "unknown-model"


def test_each_part_leaves_the_table_once_at_its_due_point_with_its_fate():
    table = PartTable()
    for seq, kind in [(1, "accept"), (2, "reject"), (3, "failsafe")]:
        assert add(table, verdict(seq, kind), now=100.5).kind == "new"
    assert table.pop_due(101.05) == []
    due = table.pop_due(101.25)
    assert [(p.key[2], p.reason) for p in due] == [(1, None), (2, "reject")]
    assert [(p.key[2], p.reason) for p in table.pop_due(1e9)] == [(3, "failsafe")]
    assert table.pop_due(1e9) == []


def test_qos1_redelivery_and_replays_are_recognised_and_never_change_a_fate():
    table = PartTable(memory=4)
    add(table, verdict(1, "reject"), now=100.5)
    assert add(table, verdict(1, "accept"), now=100.6).kind == "duplicate"  # cannot cancel the reject
    assert [p.reason for p in table.pop_due(1e9)] == ["reject"]
    assert add(table, verdict(1, "accept"), now=200.0).kind == "duplicate"  # after its due point: still known
    for seq in range(2, 8):
        add(table, verdict(seq), now=100.0)
    table.pop_due(1e9)
    assert add(table, verdict(1, "accept"), now=100.0).kind == "replay"  # forgotten, but older than what is known


def test_a_gap_reveals_parts_that_are_rejected_as_missing_at_their_interpolated_due_point():
    table = PartTable()
    add(table, verdict(1), now=100.2)
    arrival = add(table, verdict(4), now=100.5)
    assert [p.key[2] for p in arrival.gap_parts] == [2, 3] and arrival.unguarded == 0
    assert [p.due for p in arrival.gap_parts] == pytest.approx([101.2, 101.3])
    fates = [(p.key[2], p.reason) for p in table.pop_due(1e9)]
    assert fates == [(1, None), (2, "missing"), (3, "missing"), (4, None)]


def test_a_gap_parts_own_verdict_still_decides_when_it_arrives_in_time():
    table = PartTable()
    add(table, verdict(1), now=100.2)
    add(table, verdict(3), now=100.4)
    assert add(table, verdict(2), now=100.45).kind == "filled"
    assert [p.reason for p in table.pop_due(1e9)] == [None, None, None]


def test_a_verdict_that_comes_after_its_gap_part_was_rejected_is_late_not_a_second_fate():
    table = PartTable()
    add(table, verdict(1), now=100.2)
    add(table, verdict(3), now=100.4)
    assert [p.reason for p in table.pop_due(101.25)] == [None, "missing"]
    assert add(table, verdict(2), now=101.3).kind == "late"


def test_parts_already_past_their_due_point_are_unguarded_never_silently_passed():
    table = PartTable()
    add(table, verdict(1), now=100.2)
    arrival = add(table, verdict(5), now=101.35)  # the gap is noticed after parts 2 and 3 were due
    assert arrival.unguarded == 2 and [p.key[2] for p in arrival.gap_parts] == [4]
    late = add(table, verdict(6, t=100.0), now=101.35)
    assert late.kind == "late" and late.unguarded == 1


def test_a_huge_gap_is_counted_unguarded_instead_of_placing_each_part():
    table = PartTable(max_gap=10)
    add(table, verdict(1), now=100.2)
    arrival = add(table, verdict(100, t=100.3), now=100.3)
    assert arrival.unguarded == 98 and arrival.gap_parts == ()


def test_cameras_are_separate_streams():
    table = PartTable()
    add(table, verdict(1, camera="top"), now=100.0)
    assert add(table, verdict(1, camera="side"), now=100.0).kind == "new"
    assert add(table, verdict(2, camera="side"), now=100.0).gap_parts == ()


def test_count_mode_places_parts_by_the_counter_at_capture_time_and_unwraps_it():
    schedule = CountSchedule(distance=500, poll_s=0.002, offset=lambda: 0.0)
    schedule.observe(10.0, 2**32 - 100)
    schedule.observe(11.0, 900)  # wrapped: 1000 counts in a second
    assert schedule.position(11.0) == 1000
    assert schedule.due_of(10.5) == pytest.approx(500 + 500)
    assert schedule.time_of(500) == pytest.approx(10.5)
    assert schedule.time_of(2000) is None


class RecordingOutput(PulseOutput):
    kind = "test"

    def __init__(self, pulse: PulseConfig) -> None:
        super().__init__(pulse, signals=("ready",))
        self.writes: list[tuple[Signal, bool]] = []

    def _drive(self, signal: Signal, on: bool) -> None:
        self.writes.append((signal, on))


def run_until(output: RecordingOutput, end: float, step: float = 0.001) -> list[tuple[float, bool]]:
    """Poll every `step` until `end`; the reject edges as (time, on)."""
    edges, now = [], 0.0
    while now <= end:
        before = len(output.writes)
        output.poll(now)
        edges += [(now, on) for signal, on in output.writes[before:] if signal == "reject"]
        now = round(now + step, 6)
    return edges


def test_a_pulse_starts_at_its_due_point_and_lasts_its_width():
    output = RecordingOutput(PulseConfig(width_ms=40, min_off_ms=20, late_limit_ms=5))
    output.reject(PartRef(("a", "c", 1), "reject", 0.100), now=0.0)
    assert run_until(output, 0.3) == [(pytest.approx(0.100), True), (pytest.approx(0.140), False)]
    assert [e.kind for e in output.drain_events()] == ["pulse"]


def test_overlapping_pulses_and_pulses_closer_than_the_minimum_off_time_merge():
    output = RecordingOutput(PulseConfig(width_ms=40, min_off_ms=20, late_limit_ms=5))
    for seq, due in [(1, 0.100), (2, 0.120), (3, 0.170), (4, 0.300)]:
        output.reject(PartRef(("a", "c", seq), "reject", due), now=0.0)
    edges = run_until(output, 0.5)
    assert [on for _, on in edges] == [True, False, True, False]
    assert [t for t, _ in edges] == pytest.approx([0.100, 0.210, 0.300, 0.340], abs=0.0015)
    pulses = [e for e in output.drain_events() if e.kind == "pulse"]
    assert [len(e.parts) for e in pulses] == [3, 1]


def test_a_reject_that_cannot_start_by_its_late_limit_is_counted_late_and_never_fired():
    output = RecordingOutput(PulseConfig(width_ms=40, min_off_ms=20, late_limit_ms=5))
    output.reject(PartRef(("a", "c", 1), "reject", 0.100), now=0.2)
    assert run_until(output, 0.4) == []
    assert [e.kind for e in output.drain_events()] == ["late"]


def test_reject_all_holds_the_output_on_and_drops_ready_until_the_fault_clears():
    output = RecordingOutput(PulseConfig())
    output.set_fault("reject-all", 0.0)
    assert ("ready", False) in output.writes and output.writes[-1] == ("reject", True)
    output.set_fault(None, 1.0)
    assert output.writes[-2:] == [("ready", True), ("reject", False)]


def test_health_is_a_vision_fault_until_every_agent_is_online_and_heard_recently():
    health = Health(("press-3",), agent_silent_s=6.0, hold_s=5.0, broker_up=True)
    assert "press-3" in health.vision_fault(0.0)
    health.agent_status("press-3", online=True, now=1.0)
    assert health.state(2.0, "") == ("ok", "")
    assert health.state(2.0, "PLC gone") == ("output-fault", "PLC gone")
    assert "press-3" in health.vision_fault(7.5)  # silent
    health.agent_status("press-3", online=True, now=8.0)
    health.alarm("2 parts unguarded", 8.0)
    assert health.vision_fault(12.0) == "2 parts unguarded" and health.vision_fault(13.5) == ""
    health.broker_up = False
    assert health.vision_fault(14.0) == "broker connection lost"
