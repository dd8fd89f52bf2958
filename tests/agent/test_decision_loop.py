"""DecisionLoop's exactly-once core, in-process: every announced frame gets one verdict, whatever order or lateness.

Real ipc sockets and a real frame ring; the test plays capture and the engine through one Sender, so it fixes the
order in which decision sees their records (over two sockets either order can happen). Time is controlled through
the capture times the records carry. No broker: the recording publisher below stands in for MQTT.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from lineguard.agent.bundle import Manifest
from lineguard.agent.contract import Record, Verdict, decode
from lineguard.agent.decision.process import DecisionLoop
from lineguard.agent.decision.published import PublishedTracker
from lineguard.agent.ipc import Receiver, Sender, endpoint
from lineguard.agent.messages import FrameFailed, FrameReady, Message, Published, Scored, ScoreFailed, decode_ranges

THRESHOLD = 1.0


@dataclass
class RecordingPublisher:
    """Stands in for MqttPublisher: exactly the members DecisionLoop uses, keeping what it published.

    The one place that knows the publisher's API; adapt it here when that API changes.
    """

    queued: int = 0
    messages: list[tuple[str, Any]] = field(default_factory=list)

    on_settled: Any = None  # the tracker's callback, as MqttPublisher(on_settled=...) calls it

    def publish(self, topic: str, record: Record, *, qos: int, retain: bool = False, tag: object = None) -> None:
        self.messages.append((topic, decode(type(record), record.encode())))  # through the wire format
        if tag is not None and self.on_settled is not None:
            self.on_settled(tag)  # the broker acknowledges at once

    def publish_bytes(self, topic: str, payload: bytes, **options: Any) -> None:
        self.messages.append((topic, payload))

    def verdicts(self) -> list[Verdict]:
        """Verdicts in publishing order."""
        return [payload for _, payload in self.messages if isinstance(payload, Verdict)]

    def outcomes(self) -> list[tuple[int, str]]:
        """(seq, verdict) of every verdict, in publishing order."""
        return [(v.seq, v.verdict) for v in self.verdicts()]


def manifest() -> Manifest:
    """The smallest valid manifest: a 32x32 grey model with threshold 1.0."""
    rate = {"count": 0, "total": 10, "rate": 0.0, "low": 0.0, "high": 0.3}
    return Manifest.model_validate(
        {
            "model_id": "double",
            "model_version": "1",
            "created_utc": "2026-01-01T00:00:00Z",
            "trainer_version": "test",
            "dataset": {"name": "none", "digest": "0", "n_train": 1, "n_calibration": 1, "n_test": 1},
            "model": {"kind": "patchcore", "backbone": "none", "opset": 17},
            "input": {"height": 32, "width": 32, "channels": 1, "pixel_format": "mono8"},
            "threshold": {"value": THRESHOLD, "method": "manual:1", "n_good": 10, "n_defect": 0, "false_reject": rate},
            "score_normalisation": {"offset": 0.0, "scale": 2.0, "map_low": 0.0, "map_high": 2.0},
            "metrics": {},
            "golden": [],
            "files": {},
        }
    )


@dataclass
class Harness:
    loop: DecisionLoop
    publisher: RecordingPublisher
    to_decision: Sender
    capture: Any  # conftest.CaptureSide

    def send(self, *messages: Message) -> None:
        for message in messages:
            assert self.to_decision.send(message)

    def step_until(self, n_verdicts: int, *, timeout_s: float = 5.0) -> None:
        """Step until n_verdicts verdicts are out, then a few steps more, so a surplus verdict would show."""
        end = time.monotonic() + timeout_s
        while len(self.publisher.verdicts()) < n_verdicts:
            assert time.monotonic() < end, f"only {self.publisher.outcomes()} after {timeout_s} s"
            self.loop.step()
        for _ in range(3):
            self.loop.step()

    def failsafes(self, cause: str) -> float:
        return self.loop.metrics.failsafes.labels("cam0", cause)._value.get()

    def late_scores(self) -> float:
        return self.loop.metrics.late_scores._value.get()


@pytest.fixture
def decision(loop_config, capture_side, zmq_context) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(*, deadline_ms: float = 60_000.0) -> Harness:
        config = loop_config(deadline_ms=deadline_ms)
        published = PublishedTracker(config.run_dir, ["cam0"], "decision-under-test", zmq_context)
        publisher = RecordingPublisher(on_settled=published.settled)
        loop = DecisionLoop(config, {"": manifest()}, publisher, published, zmq_context)  # type: ignore[arg-type]
        sender = Sender(zmq_context, endpoint(config.run_dir, "decision"))
        assert sender.wait_connected(timeout_s=5.0)
        made.append(Harness(loop, publisher, sender, capture_side(config)))
        return made[-1]

    yield make
    for harness in made:
        harness.to_decision.close()
        harness.loop.close()


def scored(ready: FrameReady, score: float) -> Scored:
    now = time.monotonic_ns()
    return Scored(
        camera=ready.camera,
        seq=ready.seq,
        score=score,
        map_ring="",
        map_slot=-1,
        model="double@1",
        t_engine_start_ns=now,
        t_engine_end_ns=now,
    )


def test_an_engine_answer_before_its_frame_ready_gives_one_verdict_once_the_frame_is_announced(decision):
    h = decision()
    first, second = h.capture.frame(1), h.capture.frame(2)
    h.send(
        scored(first, 0.2), ScoreFailed(camera="cam0", seq=2, reason="engine: slot 1 reused", cause="slot-overwritten")
    )
    h.step_until(0)
    assert h.publisher.outcomes() == []  # answers alone, for frames not announced yet: kept, not published
    h.send(first, second)
    h.step_until(2)
    assert h.publisher.outcomes() == [(1, "accept"), (2, "failsafe")]
    assert (h.publisher.verdicts()[1].reason, h.publisher.verdicts()[1].cause) == (
        "engine: slot 1 reused",
        "slot-overwritten",
    )
    assert h.capture.ring.occupancy() == 0  # both slots released, once


def test_a_sequence_gap_fails_each_missing_frame_once_and_the_frames_around_it_are_scored(decision):
    h = decision()
    one, four = h.capture.frame(1), h.capture.frame(4)  # the records of 2 and 3 never reach decision
    h.send(one, four, scored(one, 0.5), scored(four, 3.0))
    h.step_until(4)
    assert sorted(h.publisher.outcomes()) == [(1, "accept"), (2, "failsafe"), (3, "failsafe"), (4, "reject")]
    assert len(h.publisher.verdicts()) == 4
    gap_reasons = {(v.reason, v.cause) for v in h.publisher.verdicts() if v.seq in (2, 3)}
    assert gap_reasons == {
        ("no record of this frame reached decision: capture stopped before sending it", "capture-lost")
    }
    assert h.failsafes("capture-lost") == 2


def test_a_frame_capture_reports_lost_gets_one_failsafe_with_captures_reason_after_the_frames_before_it(decision):
    h = decision()
    one = h.capture.frame(1)
    lost = FrameFailed(
        camera="cam0", seq=2, t_capture_ns=time.monotonic_ns(), reason="ring full: engine behind", cause="ring-full"
    )
    h.send(one, lost)
    h.step_until(0)
    assert h.publisher.outcomes() == []  # frame 1 is still being scored: frame 2's failsafe waits behind it
    h.send(scored(one, 0.1))
    h.step_until(2)
    assert h.publisher.outcomes() == [(1, "accept"), (2, "failsafe")]  # one camera's verdicts in seq order
    assert (h.publisher.verdicts()[1].reason, h.publisher.verdicts()[1].cause) == (
        "ring full: engine behind",
        "ring-full",
    )
    assert h.failsafes("ring-full") == 1


def test_held_failures_go_out_in_order_around_a_gap_and_at_the_earlier_frames_deadline(decision):
    h = decision(deadline_ms=300.0)
    one, five = h.capture.frame(1), h.capture.frame(5)
    full = [
        FrameFailed(camera="cam0", seq=seq, t_capture_ns=time.monotonic_ns(), reason="ring full", cause="ring-full")
        for seq in (2, 3)
    ]
    # The engine never answers 1 or 5; 2 and 3 were never in the ring; 4's record is lost (a gap).
    h.send(one, *full, five)
    h.step_until(0)
    assert h.publisher.outcomes() == []  # 2, 3 and 4 wait behind 1
    h.step_until(5, timeout_s=3.0)  # the deadline passes
    assert [seq for seq, _ in h.publisher.outcomes()] == [1, 2, 3, 4, 5]
    causes = [v.cause for v in h.publisher.verdicts()]
    assert causes[1:4] == ["ring-full", "ring-full", "capture-lost"] and causes[0] == causes[4]
    assert not h.loop.held


def test_a_frame_without_a_score_fails_safe_at_its_deadline_and_its_late_score_is_dropped(decision):
    h = decision(deadline_ms=1000.0)
    h.loop.started_ns = 0  # decision has been running long: frame 1 was not caught by its restart
    h.loop._engine_seen_ns = 0  # and the engine has been silent for as long
    overdue, waiting = h.capture.frame(1, age_ms=1500.0), h.capture.frame(2, age_ms=300.0)
    h.send(overdue, waiting)
    h.step_until(1)
    assert h.publisher.outcomes() == [(1, "failsafe")]  # frame 2 still has ~700 ms
    assert "1000 ms deadline" in h.publisher.verdicts()[0].reason
    assert h.publisher.verdicts()[0].cause == "engine-down"  # nothing has been heard from the engine
    h.send(scored(overdue, 0.1))  # the engine answers after all
    h.step_until(1)
    assert h.publisher.outcomes() == [(1, "failsafe")]
    assert h.late_scores() == 1
    time.sleep(0.8)  # frame 2's deadline passes
    h.step_until(2)
    assert h.publisher.outcomes() == [(1, "failsafe"), (2, "failsafe")]
    assert h.failsafes("engine-down") + h.failsafes("engine-late") == 2
    assert h.capture.ring.occupancy() == 0


def test_a_repeated_score_or_a_score_after_an_engine_failure_publishes_nothing_more(decision):
    h = decision()
    one, two = h.capture.frame(1), h.capture.frame(2)
    h.send(one, scored(one, 2.0), scored(one, 0.1))
    h.send(two, ScoreFailed(camera="cam0", seq=2, reason="input mismatch", cause="engine-error"), scored(two, 0.1))
    h.step_until(2)
    assert h.publisher.outcomes() == [(1, "reject"), (2, "failsafe")]
    assert h.late_scores() == 2


def test_drain_closes_every_pending_frame_with_a_failsafe_before_exit(decision):
    h = decision()
    h.send(h.capture.frame(1), h.capture.frame(2))
    while len(h.loop.pending) < 2:
        h.loop.step()
    h.loop.drain(timeout_s=0.05)
    assert h.publisher.outcomes() == [(1, "failsafe"), (2, "failsafe")]
    assert not h.loop.pending


# -- a decision restart loses nothing: capture resends what the broker does not hold yet ---------------------------


def test_a_resent_record_for_an_answered_frame_publishes_nothing_more(decision):
    h = decision()
    one = h.capture.frame(1)
    h.send(one, scored(one, 0.1))
    h.step_until(1)
    h.send(dataclasses.replace(one, resent=True))  # capture did not hear our Published before we told it
    h.step_until(1)
    assert h.publisher.outcomes() == [(1, "accept")]
    assert h.loop.duplicates == 1


def test_a_resent_frame_whose_score_was_lost_fails_safe_naming_the_decision_restart(decision):
    h = decision(deadline_ms=500.0)
    resent = dataclasses.replace(h.capture.frame(7, age_ms=600.0), resent=True)
    h.send(resent)
    h.step_until(1)
    (verdict,) = h.publisher.verdicts()
    assert (verdict.seq, verdict.verdict, verdict.cause) == (7, "failsafe", "decision-restarted")
    assert h.failsafes("decision-restarted") == 1


def test_resent_records_fill_holes_without_being_taken_for_a_gap(decision):
    h = decision()
    five, three = h.capture.frame(5), h.capture.frame(3)
    h.send(five, dataclasses.replace(three, resent=True), scored(five, 0.1), scored(three, 0.1))
    h.step_until(2)
    assert sorted(h.publisher.outcomes()) == [(3, "accept"), (5, "accept")]  # and no failsafe for 4 (acked before)


def test_capture_hears_which_verdicts_the_broker_holds_and_who_is_answering(decision, zmq_context):
    h = decision()
    acks = Receiver(zmq_context, endpoint(h.loop.config.run_dir, "capture-cam0"))
    try:
        one, two = h.capture.frame(1), h.capture.frame(2)
        h.send(one, two, scored(one, 0.1), scored(two, 2.0))
        h.step_until(2)
        heard: list[Published] = []
        end = time.monotonic() + 5
        while not any(message.seqs for message in heard) and time.monotonic() < end:
            h.loop.step()
            heard += [m for m in acks.receive_batch(16, timeout_ms=50) if isinstance(m, Published)]
        assert {m.instance for m in heard} == {"decision-under-test"}
        assert [decode_ranges(m.seqs) for m in heard if m.seqs] == [[(1, 2)]]
    finally:
        acks.close()


def test_with_a_model_per_camera_every_verdict_and_the_status_carry_that_cameras_model_and_its_threshold(
    loop_config, capture_side, zmq_context
):
    from pathlib import Path

    from lineguard.agent.config import CameraConfig, ModelConfig

    config = loop_config().model_copy(
        update={
            "models": (
                ModelConfig(id="double", bundle=Path("/d"), threshold=0.4),  # overrides the bundle's 1.0
                ModelConfig(id="cap", bundle=Path("/c")),
            ),
            "cameras": (CameraConfig(name="cam0", model="double"), CameraConfig(name="cam1", model="cap")),
        }
    )
    cap = manifest().model_copy(update={"model_id": "cap", "model_version": "7"})
    cap = cap.model_copy(update={"threshold": cap.threshold.model_copy(update={"value": 0.3})})
    published = PublishedTracker(config.run_dir, ["cam0", "cam1"], "decision-under-test", zmq_context)
    publisher = RecordingPublisher(on_settled=published.settled)
    loop = DecisionLoop(config, {"double": manifest(), "cap": cap}, publisher, published, zmq_context)  # type: ignore[arg-type]
    sender = Sender(zmq_context, endpoint(config.run_dir, "decision"))
    h = Harness(loop, publisher, sender, capture_side(config))
    try:
        assert sender.wait_connected(timeout_s=5.0)
        one = h.capture.frame(1)
        lost = FrameFailed(camera="cam1", seq=1, t_capture_ns=time.monotonic_ns(), reason="lost", cause="capture-lost")
        h.send(one, scored(one, 0.5), lost)
        h.step_until(2)
        by_camera = {v.camera: (v.verdict, v.model, v.threshold) for v in h.publisher.verdicts()}
        assert by_camera == {"cam0": ("reject", "double@1", 0.4), "cam1": ("failsafe", "cap@7", 0.3)}
        status = loop.status(online=True)
        assert status.model is None
        assert {name: camera.model for name, camera in status.cameras.items()} == {"cam0": "double@1", "cam1": "cap@7"}
    finally:
        sender.close()
        loop.close()
