"""The agent's health as the line experiences it: ok, degraded or failing, and why, from what decision sees.

Not whether processes are alive (the supervisor sees that) but whether parts get real verdicts: the failsafe
share per camera and cause over a window, a camera's verdict rate against the rate it should deliver, the
engine's own report (a ring it cannot read, silence), and the MQTT queue. Pure functions over a window of
verdicts; decision feeds it and publishes the result in the retained status and on Prometheus.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

HealthState = Literal["ok", "degraded", "failing"]

FAILING_SHARE = 0.5  # this share of a camera's verdicts failsafe over the window: failing
DEGRADED_SHARE = 0.02  # ... this share: degraded
SLOW_SHARE = 0.8  # verdicts below this share of the expected rate: degraded (none at all: failing)
QUEUE_DEGRADED = 1000  # messages held for the broker: degraded
MIN_FRAMES = 5  # fewer verdicts in the window say nothing about shares


@dataclass(frozen=True, slots=True)
class CameraHealth:
    """One camera over the window: verdicts per second, failsafe share, failsafes by cause."""

    fps: float
    expected_fps: float | None
    failsafe_share: float
    failsafes: dict[str, int]


@dataclass(frozen=True, slots=True)
class Assessment:
    state: HealthState
    reasons: tuple[str, ...]


@dataclass
class VerdictWindow:
    """The verdicts of the last `window_s` seconds, per camera: (monotonic s, failsafe cause or "")."""

    window_s: float
    _events: dict[str, deque[tuple[float, str]]] = field(default_factory=dict)

    def add(self, camera: str, now: float, cause: str | None) -> None:
        self._events.setdefault(camera, deque()).append((now, cause or ""))

    def camera(self, camera: str, now: float, *, expected_fps: float | None, running_s: float) -> CameraHealth:
        events = self._events.setdefault(camera, deque())
        while events and events[0][0] < now - self.window_s:
            events.popleft()
        span = max(min(self.window_s, running_s), 1e-3)
        causes = Counter(cause for _, cause in events if cause)
        share = sum(causes.values()) / len(events) if events else 0.0
        return CameraHealth(round(len(events) / span, 2), expected_fps, round(share, 4), dict(causes))


def assess(
    cameras: dict[str, CameraHealth], *, engine_problem: str, engine_silent_s: float, mqtt_queued: int, window_s: float
) -> Assessment:
    """The worst finding decides the state; every finding is a reason, worst first."""
    failing: list[str] = []
    degraded: list[str] = []
    if engine_silent_s > 0:
        failing.append(f"engine silent for {engine_silent_s:.0f} s")
    if engine_problem:
        failing.append(f"engine: {engine_problem}")
    for name, health in sorted(cameras.items()):
        _camera_findings(name, health, window_s, failing, degraded)
    if mqtt_queued > QUEUE_DEGRADED:
        degraded.append(f"{mqtt_queued} messages wait for the broker")
    state: HealthState = "failing" if failing else "degraded" if degraded else "ok"
    return Assessment(state, tuple(failing + degraded))


def _camera_findings(name: str, health: CameraHealth, window_s: float, failing: list[str], degraded: list[str]) -> None:
    expected = health.expected_fps
    if expected and health.fps == 0:
        failing.append(f"{name}: no verdicts for {window_s:.0f} s (expected {expected:g} fps): camera down?")
        return
    if expected and health.fps < SLOW_SHARE * expected:
        degraded.append(f"{name}: {health.fps:g} verdicts/s, expected {expected:g}")
    if health.fps * window_s < MIN_FRAMES or not health.failsafes:
        return
    by_cause = ", ".join(f"{cause} {count}" for cause, count in sorted(health.failsafes.items(), key=lambda kv: -kv[1]))
    finding = f"{name}: {100 * health.failsafe_share:.0f} % failsafe over {window_s:.0f} s ({by_cause})"
    if health.failsafe_share >= FAILING_SHARE:
        failing.append(finding)
    elif health.failsafe_share >= DEGRADED_SHARE:
        degraded.append(finding)
