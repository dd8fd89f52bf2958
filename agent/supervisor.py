"""Supervisor: starts the pipeline's processes, watches them, restarts with backoff, drains on stop.

Each process is a separate interpreter (`lineguard-agent worker ROLE`), as systemd and `ps`
see it. A dead or silent process is restarted with exponential backoff, and so is one that is
alive but cannot do its job for PROBLEM_RESTART_S (its heartbeat says what fails): a capture
whose frames all fail, or a camera whose frames the engine cannot read, restarts that
camera's capture (which recreates its ring). More than MAX_RESTARTS restarts of one process
within RESTART_WINDOW_S makes the supervisor stop everything and exit non-zero, so systemd
sees the failure. Every exit but EXIT_FATAL is restarted: workers only stop on their own when
something went wrong.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from .config import AgentConfig
from .ipc import Receiver, endpoint
from .messages import Heartbeat
from .sdnotify import SystemdNotifier

log = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
FIRST_HEARTBEAT_GRACE_S = 60.0  # model loading and camera opening may take a while
SILENT_AFTER_S = 10.0
PROBLEM_RESTART_S = 15.0  # a problem a heartbeat reports for this long restarts the process it concerns
EXIT_FATAL = 3  # a worker's "do not restart me": bad bundle or config it cannot serve


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One pipeline process: its name and the worker arguments that start it."""

    name: str
    args: tuple[str, ...]


def process_specs(config: AgentConfig) -> list[ProcessSpec]:
    """Start order: decision (receives everything), engine, the cameras, then rollout (model changes)."""
    specs = [ProcessSpec("decision", ("decision",)), ProcessSpec("engine", ("engine",))]
    specs += [ProcessSpec(f"capture-{c.name}", ("capture", c.name)) for c in config.cameras]
    specs.append(ProcessSpec("rollout", ("rollout",)))
    return specs


@dataclass(slots=True)
class _Child:
    spec: ProcessSpec
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    last_heartbeat: float = 0.0
    restarts: list[float] = field(default_factory=list)
    next_start_at: float = 0.0
    problem: str = ""  # what its last heartbeat said keeps it from its job
    problem_camera: str = ""
    problem_since: float = 0.0


class Supervisor:
    """Runs the pipeline until stopped; returns the agent's exit code from run()."""

    def __init__(self, config: AgentConfig, config_json: Path, *, worker_env: dict[str, str] | None = None) -> None:
        """worker_env: extra environment for the workers (secrets kept out of config_json)."""
        self.config, self.config_json = config, config_json
        self.worker_env = {**os.environ, **(worker_env or {})}
        self.children = [_Child(spec) for spec in process_specs(config)]
        self.stop_event = threading.Event()
        self.notifier = SystemdNotifier()
        self._context = zmq.Context()
        self._heartbeats = Receiver(self._context, endpoint(config.run_dir, "supervisor"))
        self._ready_sent = False
        self._next_watchdog = 0.0

    def run(self) -> int:
        exit_code = self._start_in_order()
        try:
            while exit_code == 0 and not self.stop_event.is_set():
                self._collect_heartbeats()
                failure = self._check_children()
                if failure is not None:
                    exit_code = failure
                    break
                self._notify_systemd()
        finally:
            self.notifier.notify("STOPPING=1")
            self._drain()
            self._heartbeats.close()
            self._context.term()
        return exit_code

    def _start_in_order(self) -> int:
        """Start each process once the one before it is up (its first heartbeat), so no frame is
        announced before decision can receive it and the engine can score it."""
        for child in self.children:
            self._start(child)
            deadline = time.monotonic() + FIRST_HEARTBEAT_GRACE_S
            while child.last_heartbeat <= child.started_at and not self.stop_event.is_set():
                self._collect_heartbeats()
                code = child.process.poll() if child.process is not None else None
                if code is not None or time.monotonic() > deadline:
                    log.error("%s did not come up (exit code %s); stopping", child.spec.name, code)
                    return 2 if code == EXIT_FATAL else 1
        return 0

    def _start(self, child: _Child) -> None:
        command = [
            sys.executable,
            "-m",
            "lineguard.agent",
            "worker",
            *child.spec.args,
            "--config-json",
            str(self.config_json),
            "--supervisor-pid",
            str(os.getpid()),
        ]
        child.process = subprocess.Popen(command, env=self.worker_env)
        child.started_at = child.last_heartbeat = time.monotonic()
        log.info("started %s (pid %d)", child.spec.name, child.process.pid)

    def _collect_heartbeats(self) -> None:
        message = self._heartbeats.receive(timeout_ms=200)
        while message is not None:
            if isinstance(message, Heartbeat):
                for child in self.children:
                    if child.process is not None and child.process.pid == message.pid:
                        child.last_heartbeat = time.monotonic()
                        self._note_problem(child, message)
            message = self._heartbeats.receive(timeout_ms=0)

    def _note_problem(self, child: _Child, heartbeat: Heartbeat) -> None:
        if heartbeat.problem and not child.problem:
            log.warning("%s reports: %s", child.spec.name, heartbeat.problem[:300])
            child.problem_since = time.monotonic()
        elif not heartbeat.problem and child.problem:
            log.info("%s recovered", child.spec.name)
        child.problem, child.problem_camera = heartbeat.problem[:300], heartbeat.camera

    def _act_on_problems(self, now: float) -> int | None:
        """Restart the process a lasting problem concerns: that camera's capture, else the reporter itself."""
        for child in self.children:
            if not child.problem or now - child.problem_since < PROBLEM_RESTART_S:
                continue
            target = (self._child(f"capture-{child.problem_camera}") if child.problem_camera else None) or child
            log.error(
                "restarting %s: %s has reported for %.0f s: %s",
                target.spec.name,
                child.spec.name,
                now - child.problem_since,
                child.problem,
            )
            child.problem, child.problem_since = "", now
            if target.process is not None and target.process.poll() is None:
                target.process.kill()
                target.process.wait()
            if not self._schedule_restart(target, now):
                return 1
        return None

    def _child(self, name: str) -> _Child | None:
        return next((child for child in self.children if child.spec.name == name), None)

    def _check_children(self) -> int | None:
        """Restart dead or silent children; an exit code when the agent must stop."""
        now = time.monotonic()
        for child in self.children:
            if child.process is None:
                if now >= child.next_start_at:
                    self._start(child)
                continue
            code = child.process.poll()
            if code is None and self._silent(child, now):
                log.error("%s sent no heartbeat for %.0f s; killing it", child.spec.name, now - child.last_heartbeat)
                child.process.kill()
                code = child.process.wait()
            if code is None:
                continue
            if code == EXIT_FATAL:
                log.error(
                    "%s cannot run with this configuration or bundle (see its error above); stopping", child.spec.name
                )
                return 2
            log.error("%s exited with code %d; restarting", child.spec.name, code)
            if not self._schedule_restart(child, now):
                return 1
        return self._act_on_problems(now)

    def _silent(self, child: _Child, now: float) -> bool:
        heard = child.last_heartbeat > child.started_at
        limit = SILENT_AFTER_S if heard else FIRST_HEARTBEAT_GRACE_S
        return now - child.last_heartbeat > limit

    def _schedule_restart(self, child: _Child, now: float) -> bool:
        child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(child.restarts) > MAX_RESTARTS:
            log.error(
                "%s restarted %d times in %.0f s; giving up so systemd sees the failure",
                child.spec.name,
                MAX_RESTARTS,
                RESTART_WINDOW_S,
            )
            return False
        child.process = None
        child.next_start_at = now + min(0.5 * 2 ** (len(child.restarts) - 1), 30.0)
        return True

    def _notify_systemd(self) -> None:
        now = time.monotonic()
        healthy = all(c.process is not None and c.last_heartbeat > c.started_at for c in self.children)
        if healthy and not self._ready_sent:
            self.notifier.notify("READY=1")
            self._ready_sent = True
            log.info("pipeline ready: %s", ", ".join(c.spec.name for c in self.children))
        interval = self.notifier.watchdog_interval_s
        if healthy and interval is not None and now >= self._next_watchdog:
            self.notifier.notify("WATCHDOG=1")
            self._next_watchdog = now + interval

    def _drain(self) -> None:
        """Stop cameras first, then decision (it closes every pending frame), then the engine and deployments."""
        order = [c for c in self.children if c.spec.args[0] == "capture"]
        order += [c for c in self.children if c.spec.args[0] == "decision"]
        order += [c for c in self.children if c.spec.args[0] in ("engine", "rollout")]
        drain_s = 2 * self.config.decision.deadline_ms / 1e3 + 5.0
        for child in order:
            if child.process is None or child.process.poll() is not None:
                continue
            child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(timeout=drain_s)
            except subprocess.TimeoutExpired:
                log.error("%s did not stop within %.0f s; killing it", child.spec.name, drain_s)
                child.process.kill()
                child.process.wait()
        log.info("all processes stopped")
