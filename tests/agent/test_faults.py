"""Faults a line will see, driven against the real agent: every captured frame still gets exactly one verdict,
failsafes name the component that failed, and the agent heals itself where it can.

Real Mosquitto, the real `lineguard-agent run` on replayed sample images, real processes killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from agent_process import AgentProcess
from mqtt_subscriber import Subscriber
from test_pipeline import AGENT, STATUS, VERDICTS, stop, use_the_fake_gige_camera, verdicts, write_config

from lineguard.agent.capture.process import ring_name
from lineguard.agent.contract import AgentStatus
from lineguard.agent.mqtt.publisher import MAX_INFLIGHT

pytestmark = pytest.mark.slow


def worker_pid(tmp_path: Path, role: str, *, other_than: int | None = None, timeout_s: float = 30.0) -> int:
    """The pid of one of the agent's workers (started with --config-json in tmp_path's run folder), waiting for
    the supervisor to (re)start it; `other_than` waits for a replacement of that pid."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = subprocess.run(
            ["pgrep", "-f", f"worker {role} --config-json {tmp_path}"], capture_output=True, text=True
        )
        pids = [int(pid) for pid in found.stdout.split() if int(pid) != other_than]
        if pids:
            return pids[0]
        assert time.monotonic() < deadline, f"no {role} worker is running after {timeout_s:.0f} s"
        time.sleep(0.1)


def redelivered_only(received: list, repeated: Counter, *, kills: int) -> str:
    """'' if every repeated verdict is what a decision killed mid-publication may add, else what is wrong.

    A verdict handed to the broker but not yet acknowledged when decision died is ambiguous: capture sends its
    record again and the new decision answers it again (at least once, as QoS 1 is). The second answer is the
    same verdict (the engine's score reached the new process) or `failsafe`/`decision-restarted`, never a
    different accept or reject, and there are at most MAX_INFLIGHT such frames per kill."""
    if sum(n - 1 for n in repeated.values()) > kills * MAX_INFLIGHT:
        return f"{dict(repeated)}: more repeats than {kills} kills can leave in flight"
    for seq in repeated:
        first, *later = [v for v in received if v.seq == seq]
        for again in later:
            if again.verdict != first.verdict and again.cause != "decision-restarted":
                return f"seq {seq}: {first.verdict} then {again.verdict} ({again.cause})"
    return ""


def kill_worker(tmp_path: Path, role: str) -> None:
    """SIGKILL one worker and wait until the supervisor has started its replacement."""
    killed = worker_pid(tmp_path, role)
    os.kill(killed, signal.SIGKILL)
    worker_pid(tmp_path, role, other_than=killed)


def kill_repeatedly(
    agent: AgentProcess, subscriber: Subscriber, tmp_path: Path, role: str, *, times: int, scored_after: int
) -> None:
    """Once the agent is ready, SIGKILL one worker `times` times; each time the supervisor restarts it (with a
    growing backoff) and `scored_after` scored verdicts must come from the replacement before the next kill."""
    agent.wait_ready()
    for _ in range(times):
        kill_worker(tmp_path, role)
        seen = len(verdicts(subscriber))
        assert subscriber.wait_until(
            lambda seen=seen: sum(v.verdict != "failsafe" for v in verdicts(subscriber)[seen:]) >= scored_after, 60
        ), f"scoring did not resume after {role} was restarted"
        time.sleep(1.0)


def every_frame_answered(received: list, *, kills: int, first_seq: int | None = None) -> None:
    """Every seq from first_seq (default: the first seen) to the last has a verdict; repeats only redeliveries."""
    seqs, repeated = exactly_once(received)
    start = seqs[0] if first_seq is None else first_seq
    assert seqs == list(range(start, seqs[-1] + 1)), "a captured frame has no verdict"
    problem = redelivered_only(received, repeated, kills=kills)
    assert not problem, problem


def exactly_once(received: list) -> tuple[list[int], Counter]:
    """The seqs seen (sorted, deduplicated) and how often each repeated seq came."""
    counts = Counter(v.seq for v in received)
    return sorted(counts), Counter({seq: n for seq, n in counts.items() if n > 1})


def test_killing_decision_three_times_mid_stream_loses_no_frame_and_repeats_only_what_was_in_flight(
    broker, trained_work, signing_key, replay, tmp_path, start_agent
):
    folder, _ = replay
    subscriber = Subscriber(broker, VERDICTS, persistent=True)
    config = write_config(tmp_path, broker, trained_work, signing_key, folder, fps=10, loop=True, deadline_ms=1000)
    agent = start_agent(config)
    assert subscriber.wait_until(lambda: len(verdicts(subscriber)) >= 10, 60)
    kill_repeatedly(agent, subscriber, tmp_path, "decision", times=3, scored_after=1)
    assert stop(agent) == 0
    every_frame_answered(verdicts(subscriber), kills=3, first_seq=1)
    causes = Counter(v.cause for v in verdicts(subscriber) if v.verdict == "failsafe")
    # While decision is away its frames wait in capture (and fill the ring) and are blamed on decision; the
    # engine may fall behind while the new decision process starts on the same cores, but is never called down.
    assert set(causes) <= {"decision-restarted", "ring-full", "engine-late"}, causes
    assert causes["decision-restarted"] > 0


def test_killing_decision_three_times_during_a_gige_stream_loses_no_frame(
    fake_camera, broker, trained_work, signing_key, replay, tmp_path, start_agent
):
    # The camera at its own rate (25 fps): frames keep coming while decision is away.
    folder, _ = replay
    subscriber = Subscriber(broker, VERDICTS, persistent=True)
    config = write_config(tmp_path, broker, trained_work, signing_key, folder, fps=10, loop=False, deadline_ms=1000)
    use_the_fake_gige_camera(config, acquisition_fps=None)
    agent = start_agent(config)
    assert subscriber.wait_until(lambda: len(verdicts(subscriber)) >= 20, 60), "the GigE stream produced no verdicts"
    kill_repeatedly(agent, subscriber, tmp_path, "decision", times=3, scored_after=1)
    assert stop(agent) == 0
    every_frame_answered(verdicts(subscriber), kills=3)
    causes = Counter(v.cause for v in verdicts(subscriber) if v.verdict == "failsafe")
    assert set(causes) <= {"decision-restarted", "ring-full", "engine-late", "capture-lost"}, causes


def agent_status(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [Path(sys.executable).with_name("lineguard-agent"), "status", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_deleted_ring_turns_the_status_failing_and_is_recreated_and_the_stream_resumes(
    broker, trained_work, signing_key, replay, tmp_path, start_agent
):
    folder, _ = replay
    subscriber = Subscriber(broker, "lineguard/#")
    config = write_config(tmp_path, broker, trained_work, signing_key, folder, fps=10, loop=True, deadline_ms=1000)
    agent = start_agent(config)
    assert subscriber.wait_until(lambda: len(verdicts(subscriber)) >= 20, 60)
    assert subscriber.wait_until(lambda: health_of(subscriber) == "ok", 30)
    assert agent_status(config).returncode == 0
    (Path("/dev/shm") / ring_name(AGENT, "cam0")).unlink()  # a tmpfs clean-up, or an operator
    agent.wait_ready()
    kill_worker(tmp_path, "engine")  # a restarted engine must find the ring again
    killed_at, seen = time.monotonic(), len(verdicts(subscriber))
    # Within 10 s the retained status stops saying ok, and says why: failing while most frames fail, degraded
    # when the agent heals before the window fills; the person at the line sees the same.
    assert subscriber.wait_until(lambda: health_of(subscriber) in ("degraded", "failing"), 10), health_of(subscriber)
    failing_after_s = time.monotonic() - killed_at
    status = subscriber.records(STATUS, AgentStatus)[-1]
    assert status.health is not None and any("cam0" in reason or "engine" in reason for reason in status.health.reasons)
    local = agent_status(config)
    assert local.returncode in (1, 2) and ("FAILING" in local.stdout or "DEGRADED" in local.stdout), local.stdout
    # It heals by itself: capture recreates its ring, the engine re-attaches, real verdicts resume.
    assert subscriber.wait_until(lambda: sum(v.verdict != "failsafe" for v in verdicts(subscriber)[seen:]) >= 10, 60), (
        "the stream did not recover"
    )
    assert (Path("/dev/shm") / ring_name(AGENT, "cam0")).exists()
    assert subscriber.wait_until(lambda: health_of(subscriber) == "ok", 30), health_said(subscriber)
    assert stop(agent) == 0
    seqs, repeated = exactly_once(verdicts(subscriber))
    assert seqs == list(range(1, seqs[-1] + 1)) and not repeated
    causes = Counter(v.cause for v in verdicts(subscriber)[seen:] if v.verdict == "failsafe")
    assert set(causes) <= {"engine-down", "ring-missing", "slot-overwritten", "engine-late", "ring-full"}, causes
    assert causes["engine-down"] > 0  # the engine was killed: the verdicts say so
    assert failing_after_s < 10


def health_of(subscriber: Subscriber) -> str:
    statuses = subscriber.records(STATUS, AgentStatus)
    return statuses[-1].health.state if statuses and statuses[-1].health else "none"


def health_said(subscriber: Subscriber) -> str:
    """The latest retained health with its reasons, for assertion messages."""
    statuses = subscriber.records(STATUS, AgentStatus)
    health = statuses[-1].health if statuses else None
    return f"{health.state}: {'; '.join(health.reasons)}" if health else "no health yet"


def test_killing_capture_mid_stream_loses_no_frame_and_numbering_continues(
    broker, trained_work, signing_key, replay, tmp_path, start_agent
):
    folder, _ = replay
    subscriber = Subscriber(broker, VERDICTS, persistent=True)
    config = write_config(tmp_path, broker, trained_work, signing_key, folder, fps=10, loop=True, deadline_ms=1000)
    agent = start_agent(config)
    assert subscriber.wait_until(lambda: len(verdicts(subscriber)) >= 10, 60)
    # The new capture takes the numbering up where the sequence file says.
    kill_repeatedly(agent, subscriber, tmp_path, "capture cam0", times=2, scored_after=5)
    assert stop(agent) == 0
    seqs, repeated = exactly_once(verdicts(subscriber))
    assert seqs == list(range(1, seqs[-1] + 1)), "a sequence number has no verdict"
    assert not repeated, f"frames answered twice: {dict(repeated)}"
    causes = Counter(v.cause for v in verdicts(subscriber) if v.verdict == "failsafe")
    # Frames announced by the dead capture are still scored or failed by name; none is blamed on decision.
    assert set(causes) <= {"capture-lost", "ring-missing", "slot-overwritten", "engine-late", "ring-full"}, causes


def test_a_stalled_engine_is_named_in_the_failsafes_and_the_status_and_is_restarted(
    broker, trained_work, signing_key, replay, tmp_path, start_agent
):
    # SIGSTOP: the engine is alive but does nothing, as with a hung GPU driver or a model that never returns.
    folder, _ = replay
    subscriber = Subscriber(broker, "lineguard/#")
    config = write_config(tmp_path, broker, trained_work, signing_key, folder, fps=10, loop=True, deadline_ms=1000)
    agent = start_agent(config)
    assert subscriber.wait_until(lambda: len(verdicts(subscriber)) >= 10, 60)
    assert subscriber.wait_until(lambda: health_of(subscriber) == "ok", 30), health_said(subscriber)
    agent.wait_ready()
    stalled = worker_pid(tmp_path, "engine")
    os.kill(stalled, signal.SIGSTOP)
    seen = len(verdicts(subscriber))
    try:
        assert subscriber.wait_until(lambda: health_of(subscriber) in ("degraded", "failing"), 15), health_of(
            subscriber
        )
        status = subscriber.records(STATUS, AgentStatus)[-1]
        assert status.health is not None and any("engine" in reason for reason in status.health.reasons), status
        # The supervisor sees a silent engine and replaces it; scored verdicts come back by themselves.
        assert subscriber.wait_until(
            lambda: sum(v.verdict != "failsafe" for v in verdicts(subscriber)[seen:]) >= 10, 90
        ), "the stream did not recover from a stalled engine"
        assert worker_pid(tmp_path, "engine") != stalled
    finally:
        if subprocess.run(["kill", "-0", str(stalled)], capture_output=True).returncode == 0:
            os.kill(stalled, signal.SIGKILL)
    assert subscriber.wait_until(lambda: health_of(subscriber) == "ok", 30), health_said(subscriber)
    assert stop(agent) == 0
    seqs, repeated = exactly_once(verdicts(subscriber))
    assert seqs == list(range(1, seqs[-1] + 1)) and not repeated
    causes = Counter(v.cause for v in verdicts(subscriber)[seen:] if v.verdict == "failsafe")
    assert set(causes) <= {"engine-late", "engine-down", "ring-full", "slot-overwritten", "ring-missing"}, causes
    assert causes["engine-late"] + causes["engine-down"] > 0


def test_a_stopped_gige_camera_turns_the_status_failing_and_its_stream_resumes_when_it_is_back(
    fake_camera, broker, trained_work, signing_key, replay, tmp_path, start_agent
):
    folder, _ = replay
    subscriber = Subscriber(broker, "lineguard/#")
    config = write_config(tmp_path, broker, trained_work, signing_key, folder, fps=10, loop=False, deadline_ms=2000)
    use_the_fake_gige_camera(config, acquisition_fps=4.0)
    agent = start_agent(config)
    assert subscriber.wait_until(lambda: len(verdicts(subscriber)) >= 20, 60), "the GigE stream produced no verdicts"
    assert subscriber.wait_until(lambda: health_of(subscriber) == "ok", 30), health_said(subscriber)
    fake_camera.kill()  # power or cable: the camera stops answering
    try:
        # No verdicts for a whole health window (10 s): failing, and the reason names the camera.
        assert subscriber.wait_until(lambda: health_of(subscriber) == "failing", 30), health_of(subscriber)
        status = subscriber.records(STATUS, AgentStatus)[-1]
        assert status.health is not None and any("cam0" in reason for reason in status.health.reasons), status
    finally:
        fake_camera.start()
    seen = len(verdicts(subscriber))
    # Capture reconnects by itself once the camera answers again.
    assert subscriber.wait_until(lambda: sum(v.verdict != "failsafe" for v in verdicts(subscriber)[seen:]) >= 10, 90), (
        "the stream did not resume when the camera came back"
    )
    assert subscriber.wait_until(lambda: health_of(subscriber) == "ok", 30), health_said(subscriber)
    assert stop(agent) == 0
    seqs, repeated = exactly_once(verdicts(subscriber))
    assert seqs == list(range(seqs[0], seqs[-1] + 1)) and not repeated, "a captured frame has no verdict"
