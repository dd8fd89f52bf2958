"""decision/health.py: the health state follows what the line gets, worst finding first."""

from __future__ import annotations

from lineguard.agent.decision.health import CameraHealth, VerdictWindow, assess


def window_of(events: list[tuple[float, str | None]], *, window_s: float = 10.0) -> VerdictWindow:
    window = VerdictWindow(window_s)
    for t, cause in events:
        window.add("top", t, cause)
    return window


def state(cameras: dict[str, CameraHealth], **overrides: object) -> tuple[str, tuple[str, ...]]:
    options = {"engine_problem": "", "engine_silent_s": 0.0, "mqtt_queued": 0, "window_s": 10.0, **overrides}
    result = assess(cameras, **options)  # type: ignore[arg-type]
    return result.state, result.reasons


def test_the_window_counts_verdicts_and_failsafes_by_cause_and_forgets_old_ones():
    events = [(float(t), None) for t in range(100)] + [(100.0 + t / 10, "engine-late") for t in range(10)]
    health = window_of(events).camera("top", 101.0, expected_fps=10.0, running_s=500.0)
    assert health.fps == 1.9  # 19 verdicts in the last 10 s: 91..99 scored, then the 10 failsafes
    assert health.failsafes == {"engine-late": 10} and health.failsafe_share == round(10 / 19, 4)


def test_every_frame_scored_at_the_expected_rate_is_ok():
    assert state({"top": CameraHealth(10.0, 10.0, 0.0, {})}) == ("ok", ())


def test_a_few_failsafes_degrade_and_most_fail_naming_the_camera_and_causes():
    few = CameraHealth(10.0, 10.0, 0.05, {"engine-late": 5})
    most = CameraHealth(10.0, 10.0, 0.9, {"ring-missing": 60, "engine-down": 30})
    assert state({"top": few}) == ("degraded", ("top: 5 % failsafe over 10 s (engine-late 5)",))
    failing, reasons = state({"top": most})
    assert failing == "failing" and reasons == ("top: 90 % failsafe over 10 s (ring-missing 60, engine-down 30)",)


def test_a_silent_camera_fails_and_a_slow_one_degrades():
    assert state({"top": CameraHealth(0.0, 10.0, 0.0, {})})[0] == "failing"
    assert state({"top": CameraHealth(6.0, 10.0, 0.0, {})}) == ("degraded", ("top: 6 verdicts/s, expected 10",))
    assert state({"top": CameraHealth(0.0, None, 0.0, {})})[0] == "ok"  # a live camera with no expected rate


def test_the_engine_s_own_report_and_a_growing_mqtt_queue_count():
    fine = {"top": CameraHealth(10.0, 10.0, 0.0, {})}
    assert state(fine, engine_problem="cannot read camera top's frames for 6 s")[0] == "failing"
    assert state(fine, engine_silent_s=4.0) == ("failing", ("engine silent for 4 s",))
    assert state(fine, mqtt_queued=5000) == ("degraded", ("5000 messages wait for the broker",))
