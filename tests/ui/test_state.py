"""What the broker said, in memory: redeliveries ignored, rates per 10 s bucket, facts for the alarm rules."""

from __future__ import annotations

import time

from lineguard.agent.contract import AgentStatus, CameraStatus, Latency, ModelEvent, Verdict
from lineguard.ui.config import AlarmConfig
from lineguard.ui.state import BUCKET_S, BUCKETS, LineState
from lineguard.ui.views import camera_stats, line_view


def verdict(seq: int, kind: str = "accept") -> Verdict:
    return Verdict(
        agent_id="press-3",
        line="line-1",
        camera="top",
        seq=seq,
        capture_ts=1000.0 + seq,
        decided_ts=1000.1 + seq,
        verdict=kind,  # type: ignore[arg-type]
        cause="ring-full" if kind == "failsafe" else None,
        reason="r",
        score=None if kind == "failsafe" else 0.5,
        threshold=0.42,
        model="brick@1.0.0",
        latency_ms=Latency(inference=10.0 + seq, total=20.0 + seq),
    )


def test_a_redelivered_verdict_changes_nothing_and_rates_count_each_frame_once():
    state = LineState()
    now = 10_000.0
    assert state.add_verdict(verdict(1), now)
    assert not state.add_verdict(verdict(1), now)  # QoS 1 duplicate
    for seq in range(2, 11):
        state.add_verdict(verdict(seq, "reject" if seq % 3 == 0 else "accept"), now + 1)
    state.add_verdict(verdict(11, "failsafe"), now + BUCKET_S)
    with state.lock:
        stats = camera_stats(state.cameras[("press-3", "top")], now + BUCKET_S)
    assert len(stats.series) == BUCKETS
    assert stats.series[-2][1:] == (7, 3, 0) and stats.series[-1][1:] == (0, 0, 1)
    assert stats.totals == {"accept": 7, "reject": 3, "failsafe": 1}
    inference = next(stage for stage in stats.latency if stage.stage == "inference")
    assert (inference.p50_ms, inference.p99_ms) == (16.0, 21.0)


def test_facts_cover_agents_with_a_status_and_cameras_of_online_agents():
    state = LineState()
    state.add_verdict(verdict(1, "failsafe"), time.time())
    facts, subjects = state.facts(AlarmConfig())
    assert facts.agents == () and facts.cameras == () and subjects == set()  # no status yet: no opinion
    state.set_status(
        AgentStatus(
            agent_id="press-3",
            line="line-1",
            online=True,
            cameras={"top": CameraStatus(fps=9.5)},
            mqtt_queued=4,
            ts=1.0,
        )
    )
    facts, subjects = state.facts(AlarmConfig())
    assert subjects == {"press-3"} and facts.agents[0].queued == (4,)
    assert facts.cameras[0].failsafes_in_window == 1 and facts.cameras[0].verdict_age_s < 5


def test_the_serving_model_went_live_when_its_push_was_accepted_even_across_a_restart():
    pushed = ModelEvent(
        agent_id="press-3",
        action="push",
        request_id="r1",
        outcome="accepted",
        model="brick@2.0.0",
        serving="brick@2.0.0",
        reason="ok",
        ts=500.0,
    )
    state = LineState()
    state.remember_model_events([pushed])  # what a restarted dashboard reads from its store
    state.set_status(AgentStatus(agent_id="press-3", line="line-1", online=True, model="brick@2.0.0", ts=1.0))
    agents, _, _ = line_view(state, "line-1")
    assert (agents[0].live_since, agents[0].live_from_event) == (500.0, True)
    state.set_status(AgentStatus(agent_id="press-3", line="line-1", online=True, model="brick@3.0.0", ts=2.0))
    agents, _, _ = line_view(state, "line-1")
    assert agents[0].live_from_event is False and agents[0].live_since is not None  # first seen here
    assert line_view(state, "line-2") == ([], [], [])


def test_an_agent_with_a_model_per_camera_names_every_model_on_its_card():
    state = LineState()
    cameras = {"lid": CameraStatus(model="cap@1.0.0", fps=2.0), "top": CameraStatus(model="brick@2.0.0", fps=2.0)}
    state.set_status(AgentStatus(agent_id="press-3", line="line-1", online=True, cameras=cameras, ts=1.0))
    agents, _, _ = line_view(state, "line-1")
    assert agents[0].model == "brick@2.0.0, cap@1.0.0"
