import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lineguard.agent.messages import (
    EngineStatus,
    FrameFailed,
    FrameReady,
    Heartbeat,
    MessageError,
    Scored,
    ScoreFailed,
    SwapModel,
    SwapResult,
    decode,
    encode,
)

EXAMPLES = [
    FrameReady(camera="cam0", seq=7, ring="lg-a-cam0-1", slot=3, t_capture_ns=123, height=2048, width=2448, channels=1),
    FrameFailed(camera="cam0", seq=8, t_capture_ns=124, reason="ring full", cause="ring-full", camera_frame_id=3),
    Scored(
        camera="cam0",
        seq=7,
        score=1.5,
        map_ring="lg-a-maps-2",
        map_slot=0,
        model="m@1",
        t_engine_start_ns=1,
        t_engine_end_ns=2,
    ),
    ScoreFailed(camera="cam0", seq=9, reason="stale slot", cause="slot-overwritten"),
    Heartbeat(process="engine", pid=42, t_ns=5, queue_depth=1),
    SwapModel(request_id="r1", bundle_dir="/var/lib/lineguard/models/m@2"),
    SwapResult(request_id="r1", ok=False, model="m@1", reason="canary failed"),
    EngineStatus(model="m@1", backend="tensorrt", detail="back end tensorrt (engines/x.plan); skipped cuda: ..."),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_type_survives_a_round_trip(message):
    assert decode(encode(message)) == message


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\xff\x00", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"_t": "FrameReady", "_v": 99}', "schema version 99"),
        (b'{"_t": "Bogus", "_v": 1}', "unknown message type"),
        (b'{"_t": "ScoreFailed", "_v": 1, "camera": "c"}', "wrong fields"),
        (
            b'{"_t": "ScoreFailed", "_v": 1, "camera": "c", "seq": "7", "reason": "x", "cause": "engine-late"}',
            "seq must be int",
        ),
        (
            b'{"_t": "ScoreFailed", "_v": 1, "camera": "c", "seq": true, "reason": "x", "cause": "engine-late"}',
            "seq must be int",
        ),
        (
            b'{"_t": "ScoreFailed", "_v": 1, "camera": "c", "seq": 7, "reason": "x", "cause": "bad luck"}',
            "cause 'bad luck' is not one of",
        ),
    ],
)
def test_malformed_messages_are_refused_with_the_reason(data, fragment):
    with pytest.raises(MessageError, match=fragment):
        decode(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_message_error(data):
    with contextlib.suppress(MessageError):
        decode(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(EXAMPLES), st.data())
def test_a_real_message_with_any_field_replaced_raises_only_message_error(message, data):
    body = json.loads(encode(message))
    body[data.draw(st.sampled_from(sorted(body)))] = data.draw(json_values)
    with contextlib.suppress(MessageError):
        decode(json.dumps(body).encode())


def test_deep_nesting_and_oversized_messages_are_refused_before_they_cost_anything():
    with pytest.raises(MessageError, match="not JSON"):
        decode(b"[" * 5000 + b"]" * 5000)
    with pytest.raises(MessageError, match="over 65536"):
        decode(b" " * 70_000)
