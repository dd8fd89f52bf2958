"""capture/link.py: frame records stay with capture until decision says the broker has their verdicts."""

from __future__ import annotations

import time

from lineguard.agent.capture.link import DecisionLink
from lineguard.agent.ipc import Receiver, Sender, endpoint
from lineguard.agent.messages import FrameFailed, Published


def failed(seq: int) -> FrameFailed:
    return FrameFailed(camera="cam0", seq=seq, t_capture_ns=seq, reason="test", cause="capture-lost")


def received(inbox: Receiver, n: int, timeout_s: float = 5.0) -> list[FrameFailed]:
    got: list[FrameFailed] = []
    end = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < end:
        got += [m for m in inbox.receive_batch(64, timeout_ms=50) if isinstance(m, FrameFailed)]
    return got


def answer(decision: Sender, link: DecisionLink, instance: str, seqs: str) -> None:
    """Decision's Published message, applied by the link (polled until it was)."""
    before = link.applied
    assert decision.send(Published(camera="cam0", instance=instance, seqs=seqs))
    end = time.monotonic() + 5
    while link.applied == before:
        assert time.monotonic() < end, "the link never applied the Published message"
        link.poll()
        time.sleep(0.01)


def test_records_are_held_until_published_and_all_held_ones_are_resent_to_a_restarted_decision(
    loop_config, zmq_context
):
    config = loop_config()
    inbox = Receiver(zmq_context, endpoint(config.run_dir, "decision"))
    link = DecisionLink(config, "cam0", zmq_context)
    to_capture = Sender(zmq_context, endpoint(config.run_dir, "capture-cam0"))
    try:
        assert link.to_decision.wait_connected(timeout_s=5) and to_capture.wait_connected(timeout_s=5)
        for seq in range(1, 6):
            link.send(failed(seq))
        assert [r.seq for r in received(inbox, 5)] == [1, 2, 3, 4, 5]
        answer(to_capture, link, "decision-a", "1-2,4")
        assert link.held == 2  # 3 and 5 wait for their verdicts
        answer(to_capture, link, "decision-a", "")
        assert received(inbox, 1, timeout_s=0.5) == []  # the same decision: nothing sent again
        answer(to_capture, link, "decision-b", "")  # decision restarted: it lost what it held
        again = received(inbox, 2)
        assert [(r.seq, r.resent) for r in again] == [(3, True), (5, True)]
    finally:
        for closable in (inbox, to_capture):
            closable.close()
        link.close()


def test_records_wait_while_decision_is_away_and_go_out_in_order_when_it_returns(loop_config, zmq_context):
    config = loop_config()
    link = DecisionLink(config, "cam0", zmq_context)
    try:
        for seq in range(1, 4):
            link.send(failed(seq))  # nobody listens yet
        inbox = Receiver(zmq_context, endpoint(config.run_dir, "decision"))
        try:
            end = time.monotonic() + 5
            got: list[FrameFailed] = []
            while len(got) < 3 and time.monotonic() < end:
                link.flush()
                got += [m for m in inbox.receive_batch(64, timeout_ms=50) if isinstance(m, FrameFailed)]
            assert [r.seq for r in got] == [1, 2, 3]
        finally:
            inbox.close()
    finally:
        link.close()
