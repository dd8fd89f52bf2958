"""take_batch: which frames the engine scores next when cameras have models of their own."""

from __future__ import annotations

from collections import deque

from lineguard.agent.engine.batching import take_batch
from lineguard.agent.messages import FrameReady

MS = 1_000_000
SLOT_OF = {"top": "brick", "side": "brick", "lid": "cap"}


def frame(camera: str, seq: int, *, captured_ms: float) -> FrameReady:
    return FrameReady(camera, seq, f"ring-{camera}", seq % 8, int(captured_ms * MS), 32, 32, 1)


def take(backlog: deque[FrameReady], *, now_ms: float = 100.0, max_batch: int = 4, expected_ms: float = 0.0):
    return take_batch(
        backlog,
        SLOT_OF,
        max_batch=max_batch,
        now_ns=int(now_ms * MS),
        deadline_ns=250 * MS,
        expected_batch_ns={"brick": int(expected_ms * MS), "cap": int(expected_ms * MS)},
    )


def keys(frames) -> list[tuple[str, int]]:
    return [(ready.camera, ready.seq) for ready in frames]


def test_a_batch_holds_one_models_frames_from_all_its_cameras_and_the_others_keep_their_order():
    backlog = deque(
        [
            frame("top", 1, captured_ms=10),
            frame("lid", 1, captured_ms=11),
            frame("side", 1, captured_ms=12),
            frame("lid", 2, captured_ms=13),
            frame("top", 2, captured_ms=14),
        ]
    )
    first = take(backlog)
    assert first.slot == "brick" and keys(first.frames) == [("top", 1), ("side", 1), ("top", 2)]
    assert keys(backlog) == [("lid", 1), ("lid", 2)]
    second = take(backlog)
    assert second.slot == "cap" and keys(second.frames) == [("lid", 1), ("lid", 2)]
    assert not backlog and not first.late and not second.late


def test_the_model_with_the_oldest_waiting_frame_goes_first_and_a_full_batch_leaves_the_rest():
    backlog = deque([frame("lid", 1, captured_ms=5)] + [frame("top", seq, captured_ms=6 + seq) for seq in range(1, 6)])
    batch = take(backlog, max_batch=2)
    assert batch.slot == "cap" and keys(batch.frames) == [("lid", 1)]  # cap's frame is the oldest
    batch = take(backlog, max_batch=2)
    assert batch.slot == "brick" and keys(batch.frames) == [("top", 1), ("top", 2)]
    assert keys(backlog) == [("top", 3), ("top", 4), ("top", 5)]


def test_frames_that_would_miss_their_deadline_are_shed_with_their_age_whatever_their_model():
    backlog = deque(
        [
            frame("lid", 1, captured_ms=0),  # 300 ms old at now = 300: past the 250 ms deadline
            frame("top", 1, captured_ms=100),  # 200 ms + 60 ms expected > 250 ms
            frame("side", 1, captured_ms=200),
            frame("lid", 2, captured_ms=210),
        ]
    )
    batch = take(backlog, now_ms=300, expected_ms=60)
    assert [(ready.camera, ready.seq, age // MS) for ready, age in batch.late] == [("lid", 1, 300), ("top", 1, 200)]
    assert batch.slot == "brick" and keys(batch.frames) == [("side", 1)]
    assert keys(backlog) == [("lid", 2)]


def test_every_frame_ends_in_exactly_one_place():
    backlog = deque(frame(camera, seq, captured_ms=seq * 7) for seq in range(1, 40) for camera in SLOT_OF)
    announced = keys(backlog)
    seen: list[tuple[str, int]] = []
    while backlog:
        batch = take(backlog, now_ms=260, max_batch=3, expected_ms=5)
        assert len({SLOT_OF[ready.camera] for ready in batch.frames}) <= 1
        seen += keys(batch.frames) + keys(ready for ready, _ in batch.late)
    assert sorted(seen) == sorted(announced)
