"""The decision process keeps samples: its loop in-process on real rings, the real store on disk, no broker.

The recording publisher of test_decision_loop stands in for MQTT (records go through the wire format).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator

import cv2
import numpy as np
import pytest
from test_decision_loop import RecordingPublisher, manifest, scored
from test_samples_store import verdict

from lineguard.agent.config import AgentConfig, SamplesConfig
from lineguard.agent.contract import SampleRecord
from lineguard.agent.decision.heatmap import render_heatmap
from lineguard.agent.decision.process import DecisionLoop
from lineguard.agent.decision.published import PublishedTracker
from lineguard.agent.ipc import Sender, endpoint
from lineguard.agent.messages import FrameFailed
from lineguard.agent.ring import AttachedRings
from lineguard.agent.samples.files import VIEW_FILE, read_sample, sample_folders
from lineguard.agent.samples.ratelimit import RateLimit
from lineguard.agent.samples.writer import SampleSink
from lineguard.trainer.data import read_image

# manifest(): threshold 1.0, scale 2.0 -> median good score 0.0; margin 0.2 makes scores from 0.8 close calls.


def with_samples(config: AgentConfig, **settings: object) -> AgentConfig:
    values = {"close_call_margin": 0.2, "random_one_in": 0, **settings}
    return config.model_copy(update={"samples": SamplesConfig(**values)})  # type: ignore[arg-type]


@pytest.fixture
def loop_with_samples(loop_config, capture_side, zmq_context) -> Iterator[Callable[..., tuple]]:
    made: list[tuple[DecisionLoop, Sender]] = []

    def make(**settings: object) -> tuple[DecisionLoop, RecordingPublisher, Sender, object]:
        config = with_samples(loop_config(), **settings)
        published = PublishedTracker(config.run_dir, [camera.name for camera in config.cameras], "test", zmq_context)
        publisher = RecordingPublisher(on_settled=published.settled)
        loop = DecisionLoop(config, {"": manifest()}, publisher, published, zmq_context)  # type: ignore[arg-type]
        sender = Sender(zmq_context, endpoint(config.run_dir, "decision"))
        assert sender.wait_connected(timeout_s=5.0)
        made.append((loop, sender))
        return loop, publisher, sender, capture_side(config)

    yield make
    for loop, sender in made:
        sender.close()
        loop.close()


def run_until(loop: DecisionLoop, publisher: RecordingPublisher, n_verdicts: int) -> None:
    end = time.monotonic() + 5
    while len(publisher.verdicts()) < n_verdicts:
        assert time.monotonic() < end
        loop.step()


def stored(config: AgentConfig) -> dict[int, object]:
    return {info.meta.decision.seq: info for info in map(read_sample, sample_folders(config.state_dir / "samples"))}


def test_rejects_close_calls_and_failsafes_are_stored_and_announced_and_plain_accepts_are_not(loop_with_samples):
    loop, publisher, sender, capture = loop_with_samples()
    frames = [capture.frame(seq) for seq in range(1, 5)]
    for ready, score in zip(frames[:3], (1.5, 0.9, 0.1), strict=True):  # reject, close call, plain accept
        sender.send(ready)
        sender.send(scored(ready, score))
    sender.send(
        FrameFailed(camera="cam0", seq=4, t_capture_ns=frames[3].t_capture_ns, reason="lost", cause="capture-lost")
    )
    run_until(loop, publisher, 4)
    loop.samples.close()  # writes what is queued
    on_disk = stored(loop.config)
    assert {seq: info.meta.kind for seq, info in on_disk.items()} == {1: "reject", 2: "close-call", 4: "failsafe"}
    view = read_image(on_disk[1].path / VIEW_FILE)
    assert view.shape == (32, 32) and (view == 1).all()  # the frame's pixels (seq % 256) as the model saw them
    assert on_disk[4].meta.decision.reason == "lost" and not on_disk[4].meta.view
    records = [payload for _, payload in publisher.messages if isinstance(payload, SampleRecord)]
    assert sorted((r.seq, r.kind, r.verdict) for r in records) == [
        (1, "reject", "reject"),
        (2, "close-call", "accept"),
        (4, "failsafe", "failsafe"),
    ]
    thumbnail = cv2.imdecode(np.frombuffer(base64.b64decode(records[0].thumbnail_jpeg), np.uint8), cv2.IMREAD_COLOR)
    assert thumbnail.shape[:2] == (160, 160)


def test_samples_past_the_per_minute_budget_are_dropped_counted_and_every_frame_still_gets_its_verdict(
    loop_with_samples,
):
    loop, publisher, sender, capture = loop_with_samples(max_per_minute=3)
    for seq in range(1, 7):
        ready = capture.frame(seq)
        sender.send(ready)
        sender.send(scored(ready, 5.0))
    run_until(loop, publisher, 6)
    loop.samples.close()
    assert [v.verdict for v in publisher.verdicts()] == ["reject"] * 6
    assert sorted(stored(loop.config)) == [1, 2, 3]
    assert loop.samples.drops["rate-limit"] == 3
    assert (
        loop.metrics.registry.get_sample_value(
            "lineguard_samples_dropped_total", {"camera": "cam0", "reason": "rate-limit"}
        )
        == 3
    )


def test_a_sample_that_cannot_be_written_is_dropped_and_counted(loop_with_samples):
    loop, publisher, sender, capture = loop_with_samples()
    (loop.config.state_dir / "samples" / "cam0").write_text("a file where the camera's folder belongs")
    ready = capture.frame(1)
    sender.send(ready)
    sender.send(scored(ready, 5.0))
    run_until(loop, publisher, 1)
    loop.samples.close()
    assert loop.samples.drops["write-failed"] == 1 and publisher.verdicts()[0].verdict == "reject"


def test_with_full_roi_the_roi_at_camera_resolution_is_kept_too(loop_with_samples):
    loop, publisher, sender, capture = loop_with_samples(full_roi=True)
    ready = capture.frame(3)
    sender.send(ready)
    sender.send(scored(ready, 5.0))
    run_until(loop, publisher, 1)
    loop.samples.close()
    info = stored(loop.config)[3]
    roi = read_image(info.path / "roi.png")
    assert info.meta.roi and info.meta.roi_box == (0, 0, 32, 32) and roi.shape == (32, 32) and (roi == 3).all()


def test_a_store_that_cannot_be_created_drops_samples_and_decisions_go_on(loop_with_samples, tmp_path):
    (tmp_path / "not-a-folder").write_text("x")
    loop, publisher, sender, capture = loop_with_samples(dir=tmp_path / "not-a-folder" / "samples")
    ready = capture.frame(1)
    sender.send(ready)
    sender.send(scored(ready, 5.0))
    run_until(loop, publisher, 1)
    loop.samples.close()
    assert publisher.verdicts()[0].verdict == "reject" and loop.samples.drops["write-failed"] == 1


def test_a_full_queue_drops_new_samples_instead_of_waiting(loop_config, capture_side):
    config = with_samples(loop_config(), queue_length=1)
    capture = capture_side(config)
    sink = SampleSink(config, rings=AttachedRings(), publisher=None, overlay=render_heatmap)
    offer_s = []
    for seq in range(1, 41):
        ready = capture.frame(seq)
        started = time.perf_counter()
        sink.offer(verdict(seq, camera="cam0"), ready=ready, manifest=manifest())
        offer_s.append(time.perf_counter() - started)
        capture.ring.release(ready.slot, seq)
    sink.close()
    assert sink.drops["queue-full"] > 0
    assert sink.stored + sink.drops["queue-full"] == 40
    assert max(offer_s) < 0.05  # an offer never waits for the disk


def test_the_rate_limit_allows_a_minute_s_worth_then_refills_evenly():
    now = [0.0]
    limit = RateLimit(6, clock=lambda: now[0])
    assert [limit.allow() for _ in range(7)] == [True] * 6 + [False]
    now[0] += 10.0  # 6 per minute: one per 10 s
    assert [limit.allow(), limit.allow()] == [True, False]
