"""ipc.py over real ZeroMQ ipc:// sockets, with senders in separate processes where it matters."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import zmq

from lineguard.agent.ipc import IpcError, Receiver, Sender, endpoint
from lineguard.agent.messages import FrameFailed, FrameReady, Heartbeat, Scored, ScoreFailed, encode

SAMPLES = [
    FrameReady(
        camera="cam0",
        seq=42,
        ring="frames",
        slot=3,
        t_capture_ns=1_700_000_000_123_456_789,
        height=2048,
        width=2448,
        channels=1,
    ),
    FrameReady(
        camera="cam1",
        seq=0,
        ring="frames",
        slot=0,
        t_capture_ns=1,
        height=4,
        width=5,
        channels=3,
        camera_frame_id=65535,
    ),
    FrameFailed(camera="cam0", seq=43, t_capture_ns=2, reason="camera buffer TIMEOUT", cause="capture-lost"),
    Scored(
        camera="cam0",
        seq=42,
        score=0.731,
        map_ring="maps",
        map_slot=7,
        model="brick@3",
        t_engine_start_ns=5,
        t_engine_end_ns=9,
    ),
    ScoreFailed(
        camera="cam0", seq=44, reason="ring 'frames' slot 3 holds seq 41, expected 44", cause="slot-overwritten"
    ),
    Heartbeat(process="engine", pid=1234, t_ns=99, queue_depth=2),
]

SEND_SCRIPT = """
    import sys, time, zmq
    from lineguard.agent.ipc import Sender
    from lineguard.agent.messages import *
    messages = {messages}
    context = zmq.Context()
    with Sender(context, sys.argv[1]) as sender:
        for message in messages:
            deadline = time.monotonic() + 10
            while not sender.send(message):  # False until the connection is up
                assert time.monotonic() < deadline, "receiver never became reachable"
                time.sleep(0.001)
    context.term()
"""


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.term()  # hangs if a socket was left open or lingers: part of every test


def start_sender(address: str, messages: list) -> subprocess.Popen[str]:
    code = textwrap.dedent(SEND_SCRIPT).format(messages=repr(messages))
    return subprocess.Popen(
        [sys.executable, "-c", code, address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen[str]) -> None:
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr


def receive_all(receiver: Receiver, count: int) -> list:
    received = []
    deadline = time.monotonic() + 20
    while len(received) < count and time.monotonic() < deadline:
        received += receiver.receive_batch(count - len(received), timeout_ms=200)
    return received


def send_eventually(sender: Sender, message) -> None:
    """Retry send() for up to 5 s: False until the connection is up, or until the peer frees its queue."""
    deadline = time.monotonic() + 5
    while not sender.send(message):
        assert time.monotonic() < deadline, "send() kept returning False"
        time.sleep(0.001)


def test_endpoint_names_a_socket_in_the_run_directory(tmp_path):
    assert endpoint(tmp_path, "frames") == f"ipc://{tmp_path}/frames.sock"
    with pytest.raises(IpcError, match="endpoint name"):
        endpoint(tmp_path, "a/b")
    with pytest.raises(IpcError, match="longer than the 107 bytes"):
        endpoint(tmp_path / ("d" * 100), "frames")


def test_every_message_type_survives_the_trip_between_processes(context, tmp_path):
    address = endpoint(tmp_path, "decision")
    with Receiver(context, address) as receiver:
        sender = start_sender(address, SAMPLES)
        received = receive_all(receiver, len(SAMPLES))
        finish(sender)
    assert received == SAMPLES
    assert [type(m) for m in received] == [type(m) for m in SAMPLES]
    assert receiver.malformed_count == 0


def test_one_receiver_takes_messages_from_two_sending_processes(context, tmp_path):
    address = endpoint(tmp_path, "supervisor")
    beats = {name: [Heartbeat(process=name, pid=i, t_ns=i) for i in range(50)] for name in ("capture", "engine")}
    with Receiver(context, address) as receiver:
        senders = [start_sender(address, messages) for messages in beats.values()]
        received = receive_all(receiver, 100)
        for sender in senders:
            finish(sender)
    for name, sent in beats.items():
        assert [m for m in received if m.process == name] == sent  # all there, in order per sender


def test_send_returns_false_at_once_when_no_receiver_is_bound(context, tmp_path):
    with Sender(context, endpoint(tmp_path, "nobody")) as sender:
        started = time.monotonic()
        results = [sender.send(SAMPLES[0]) for _ in range(100)]
        assert not any(results)
        assert time.monotonic() - started < 0.5


def test_send_returns_false_instead_of_blocking_when_the_queue_is_full(context, tmp_path):
    address = endpoint(tmp_path, "slow")
    with Receiver(context, address) as receiver, Sender(context, address, high_water_mark=10) as sender:
        send_eventually(sender, SAMPLES[-1])
        sent, started = 1, time.monotonic()
        while sender.send(SAMPLES[-1]):  # nobody receives: the queues fill up
            sent += 1
            assert sent < 200_000, "send() never reported a full queue"
        assert time.monotonic() - started < 10
        assert sent >= 10  # at least the sender's own high-water mark
        assert receive_all(receiver, sent) == [SAMPLES[-1]] * sent  # every accepted message arrives
        send_eventually(sender, SAMPLES[-1])  # and once drained, sending works again


def test_malformed_messages_are_counted_and_skipped_and_later_ones_still_arrive(context, tmp_path, caplog):
    address = endpoint(tmp_path, "engine")
    garbage = [
        [b"\xff\x00 raw bytes"],
        [b"not json either"],  # same kind as the one above: no second warning
        [b"[" * 100_000],  # json's RecursionError
        [encode(SAMPLES[0]), b"second part"],
        [json.dumps({"_t": "FrameReady", "_v": 999}).encode()],
        [encode(SAMPLES[0]).replace(b'"seq":42', b'"seq":"42"')],
    ]
    with Receiver(context, address) as receiver, context.socket(zmq.PUSH) as raw:
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(address)
        with caplog.at_level(logging.WARNING, logger="lineguard.agent.ipc"):
            for frames in garbage:
                raw.send_multipart(frames)
            raw.send(encode(SAMPLES[3]))
            assert receiver.receive(timeout_ms=5000) == SAMPLES[3]
            raw.send(b"garbage")
            raw.send(encode(SAMPLES[4]))
            assert receiver.receive(timeout_ms=5000) == SAMPLES[4]
    assert receiver.malformed_count == len(garbage) + 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5, warnings  # one per kind, the repeated "not JSON" kind only once
    assert any("not JSON" in w for w in warnings) and any("2-part message" in w for w in warnings)
    assert any("FrameReady.seq must be int" in w for w in warnings)


def test_receive_batch_waits_for_the_first_message_only(context, tmp_path):
    address = endpoint(tmp_path, "batch")
    with Receiver(context, address) as receiver, Sender(context, address) as sender:
        started = time.monotonic()
        assert receiver.receive_batch(10, timeout_ms=100) == []
        assert 0.09 < time.monotonic() - started < 1
        assert receiver.receive(timeout_ms=50) is None
        beats = [Heartbeat(process="capture", pid=1, t_ns=i) for i in range(5)]
        send_eventually(sender, beats[0])
        for beat in beats[1:]:
            assert sender.send(beat)
        time.sleep(0.2)  # all five reach the receiver's queue
        assert receiver.receive_batch(3, timeout_ms=1000) == beats[:3]
        started = time.monotonic()
        assert receiver.receive_batch(10, timeout_ms=2000) == beats[3:]  # no waiting for more than are queued
        assert time.monotonic() - started < 0.5


def test_a_receiver_replaces_a_stale_socket_file_but_not_a_live_one_or_a_plain_file(context, tmp_path):
    address = endpoint(tmp_path, "stale")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "stale.sock"))
    dead.close()  # the file stays, as after a crash
    with Receiver(context, address) as receiver, Sender(context, address) as sender:
        send_eventually(sender, SAMPLES[2])
        assert receiver.receive(timeout_ms=1000) == SAMPLES[2]
        with pytest.raises(IpcError, match="bound by a running process"):
            Receiver(context, address)
    (tmp_path / "plain.sock").write_text("keep me")
    with pytest.raises(IpcError, match="not a socket"):
        Receiver(context, endpoint(tmp_path, "plain"))
    with pytest.raises(IpcError, match="cannot bind"):
        Receiver(context, endpoint(tmp_path / "missing", "x"))


def test_closing_a_sender_with_undelivered_messages_does_not_hang(tmp_path):
    context = zmq.Context()
    address = endpoint(tmp_path, "gone")
    receiver = Receiver(context, address)
    sender = Sender(context, address, high_water_mark=100)
    send_eventually(sender, SAMPLES[0])
    while sender.send(SAMPLES[0]):
        pass
    receiver.close()
    started = time.monotonic()
    sender.close()
    context.term()
    assert time.monotonic() - started < 1


def test_a_bad_high_water_mark_is_refused(context, tmp_path):
    with pytest.raises(IpcError, match="high_water_mark must be an integer >= 1"):
        Sender(context, endpoint(tmp_path, "x"), high_water_mark=0)


def test_wait_connected_is_true_once_a_receiver_is_bound_and_false_without_one(tmp_path):
    import zmq

    from lineguard.agent.ipc import Receiver, Sender, endpoint

    context = zmq.Context()
    address = endpoint(tmp_path, "probe")
    sender = Sender(context, address)
    assert not sender.wait_connected(timeout_s=0.1)
    receiver = Receiver(context, address)
    assert sender.wait_connected(timeout_s=5.0)
    sender.close()
    receiver.close()
    context.term()
