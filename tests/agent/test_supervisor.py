"""Supervisor restart policy, in-process: backoff 0.5, 1, 2, 4, 8 s, give up after 5 restarts in 60 s.

No worker is started: `_start` hands each child a stand-in process whose exit code the test sets, and the
supervisor's clock is a value the test moves. The heartbeat socket is real.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from lineguard.agent import supervisor as supervisor_module
from lineguard.agent.messages import Heartbeat
from lineguard.agent.supervisor import EXIT_FATAL, MAX_RESTARTS, SILENT_AFTER_S, Supervisor


@dataclass
class Clock:
    """Stands in for the time module inside supervisor.py: monotonic() is what the test says."""

    now: float = 1000.0

    def monotonic(self) -> float:
        return self.now


@dataclass
class StandInProcess:
    """The subprocess.Popen members the supervisor uses; `returncode` None while "running"."""

    pid: int
    returncode: int | None = None
    killed: bool = False

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.killed, self.returncode = True, -9

    def wait(self, timeout: float | None = None) -> int:
        assert self.returncode is not None, "waited on a process that was never told to stop"
        return self.returncode


@dataclass
class Run:
    supervisor: Supervisor
    clock: Clock
    starts: list[tuple[str, float]] = field(default_factory=list)

    def child(self, name: str):
        return next(c for c in self.supervisor.children if c.spec.name == name)

    def heartbeat_all(self) -> None:
        for child in self.supervisor.children:
            child.last_heartbeat = self.clock.now

    def check(self) -> int | None:
        return self.supervisor._check_children()


@pytest.fixture
def run(loop_config, monkeypatch) -> Iterator[Run]:
    clock = Clock()
    monkeypatch.setattr(supervisor_module, "time", clock)
    config = loop_config()
    config.run_dir.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(config, config.run_dir / "config.json")
    state = Run(supervisor, clock)

    def start(child) -> None:
        child.process = StandInProcess(pid=10_000 + len(state.starts))
        child.started_at = child.last_heartbeat = clock.now
        state.starts.append((child.spec.name, clock.now))

    monkeypatch.setattr(supervisor, "_start", start)
    for child in supervisor.children:
        start(child)
    state.heartbeat_all()
    yield state
    supervisor._heartbeats.close()
    supervisor._context.term()


def test_a_crashing_process_is_restarted_after_doubling_waits_then_the_agent_gives_up(run):
    engine = run.child("engine")
    delays = []
    for _ in range(MAX_RESTARTS):
        engine.process.returncode = 1
        crashed_at = run.clock.now
        assert run.check() is None and engine.process is None  # restart scheduled, not yet done
        while engine.process is None:
            run.clock.now += 0.125
            assert run.check() is None
        delays.append(run.starts[-1][1] - crashed_at)
        run.heartbeat_all()
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]
    engine.process.returncode = 1
    assert run.check() == 1  # the sixth crash within 60 s: stop, so systemd sees the failure
    assert [name for name, _ in run.starts].count("engine") == 1 + MAX_RESTARTS


def test_crashes_further_apart_than_the_window_start_the_backoff_over(run):
    engine = run.child("engine")
    for _ in range(2 * MAX_RESTARTS):
        engine.process.returncode = 1
        crashed_at = run.clock.now
        assert run.check() is None
        run.clock.now += 0.5
        assert run.check() is None and engine.process is not None
        assert run.starts[-1] == ("engine", crashed_at + 0.5)  # always the first wait
        run.clock.now += 61.0  # a quiet minute
        run.heartbeat_all()


def test_a_silent_process_is_killed_and_restarted(run):
    capture = run.child("capture-cam0")
    silent = capture.process
    run.clock.now += 1.0
    run.heartbeat_all()  # every process has been heard from once
    run.clock.now += SILENT_AFTER_S + 0.1
    for child in run.supervisor.children:
        if child is not capture:
            child.last_heartbeat = run.clock.now
    assert run.check() is None
    assert silent.killed and capture.process is None
    run.clock.now += 0.5
    assert run.check() is None and capture.process is not None and capture.process is not silent


def test_a_process_that_cannot_run_this_config_stops_the_agent_without_a_restart(run):
    run.child("decision").process.returncode = EXIT_FATAL
    starts_before = len(run.starts)
    assert run.check() == 2
    assert len(run.starts) == starts_before


def test_an_engine_that_cannot_read_a_cameras_frames_for_long_gets_that_capture_restarted(run):
    engine = run.child("engine")
    problem = Heartbeat(
        process="engine", pid=engine.process.pid, t_ns=0, problem="cannot read cam0's frames", camera="cam0"
    )
    run.supervisor._note_problem(engine, problem)
    run.clock.now += supervisor_module.PROBLEM_RESTART_S - 1
    run.heartbeat_all()
    assert run.check() is None and not run.child("capture-cam0").process.killed  # not yet: it may heal itself
    run.clock.now += 2
    run.heartbeat_all()
    capture = run.child("capture-cam0")
    assert run.check() is None
    assert capture.process is None and capture.next_start_at > run.clock.now  # killed, restart scheduled
    assert not engine.process.killed  # the engine itself is fine


def test_a_problem_that_clears_restarts_nothing(run):
    capture = run.child("capture-cam0")
    run.supervisor._note_problem(
        capture, Heartbeat(process="c", pid=1, t_ns=0, problem="all frames failed", camera="cam0")
    )
    run.clock.now += 5
    run.supervisor._note_problem(capture, Heartbeat(process="c", pid=1, t_ns=0))
    run.clock.now += supervisor_module.PROBLEM_RESTART_S
    run.heartbeat_all()
    assert run.check() is None and capture.process is not None and not capture.process.killed
