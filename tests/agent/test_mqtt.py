"""MqttPublisher against a real Mosquitto: delivery, order, outages, retained status, last will, TLS, auth, queue."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from broker import MosquittoBroker, find_program, free_port, make_tls_files
from mqtt_subscriber import Subscriber

from lineguard.agent.config import MqttConfig
from lineguard.agent.contract import AgentStatus, HeatmapInfo, Latency, Topics, Verdict, decode
from lineguard.agent.mqtt import MqttError, MqttPublisher

TOPICS = Topics("lineguard")
VERDICTS = TOPICS.verdict("line-1", "agent-1", "cam0")
HEATMAPS = TOPICS.heatmap("line-1", "agent-1", "cam0")
STATUS = TOPICS.status("agent-1")


@pytest.fixture
def subscribe() -> Iterator[Callable[..., Subscriber]]:
    made: list[Subscriber] = []

    def make(broker: MosquittoBroker, topic: str = "lineguard/#", **options: Any) -> Subscriber:
        made.append(Subscriber(broker, topic, **options))
        return made[-1]

    yield make
    for each in made:
        each.close()


@pytest.fixture
def publisher() -> Iterator[Callable[..., MqttPublisher]]:
    """Build MqttPublishers (unique client ids, status on TOPICS.status); all are closed after the test."""
    made: list[MqttPublisher] = []

    def make(port: int, **config: Any) -> MqttPublisher:
        settings = MqttConfig(port=port, **config)
        client_id = f"pub-{uuid.uuid4().hex[:8]}"
        made.append(MqttPublisher(settings, client_id=client_id, status_topic=STATUS, will=status(online=False)))
        return made[-1]

    yield make
    for each in made:
        each.close(flush_timeout_s=0.5)


def wait_for(done: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def start_before_the_publisher_reconnects(broker: MosquittoBroker, pub: MqttPublisher, failures: int) -> None:
    """Start `broker` right after the third failed connection attempt of `pub` since its count was `failures`.

    paho doubles its wait after each failed attempt (1, 2, then 4 s), so a subscriber connected now is there
    about 4 s before the publisher delivers what it held, even on a loaded CI machine (no test depends on the
    broker queueing for an offline subscriber: QoS 0 messages are not queued for one)."""
    assert wait_for(lambda: pub.connect_failures >= failures + 3, 10), "the publisher stopped trying to connect"
    broker.start()


def verdict(seq: int) -> Verdict:
    kind = "reject" if seq % 7 == 0 else "accept"
    return Verdict(
        agent_id="agent-1",
        line="line-1",
        camera="cam0",
        seq=seq,
        capture_ts=1.0e9,
        decided_ts=1.0e9,
        verdict=kind,
        reason="test",
        score=0.25,
        threshold=0.5,
        model="brick@1.0.0",
        latency_ms=Latency(total=1.0),
    )


def heatmap(pub: MqttPublisher, seq: int) -> None:
    info = HeatmapInfo(agent_id="agent-1", camera="cam0", seq=seq, model="brick@1.0.0", format="jpeg")
    pub.publish_bytes(HEATMAPS, b"\xff\xd8 jpeg", qos=0, user_properties=info.user_properties())


def status(*, online: bool, reason: str = "", model: str | None = None) -> AgentStatus:
    return AgentStatus(agent_id="agent-1", line="line-1", online=online, model=model, reason=reason, ts=1.0e9)


def test_a_qos1_json_verdict_makes_the_round_trip(broker, subscribe, publisher):
    subscriber = subscribe(broker, VERDICTS)
    pub = publisher(broker.port)
    assert pub.wait_connected(5)
    pub.publish(VERDICTS, verdict(1), qos=1)
    assert pub.flush(5)
    assert subscriber.wait_until(lambda: len(subscriber.messages) == 1, 5)
    assert subscriber.verdicts(VERDICTS) == [verdict(1)]
    assert (pub.acknowledged, pub.dropped, pub.queued) == (1, 0, 0)


def test_5000_verdicts_published_quickly_arrive_exactly_once_and_in_order(broker, subscribe, publisher):
    subscriber = subscribe(broker, VERDICTS)
    pub = publisher(broker.port)
    assert pub.wait_connected(5)
    started = time.perf_counter()
    for seq in range(5000):
        pub.publish(VERDICTS, verdict(seq), qos=1)
    publish_s = time.perf_counter() - started
    assert publish_s < 2.0, f"publishing 5000 messages took {publish_s:.2f} s: the caller must not wait for the broker"
    assert pub.flush(30)
    assert subscriber.wait_until(lambda: len(subscriber.messages) >= 5000, 10)
    time.sleep(0.2)  # a duplicate would come right behind
    assert subscriber.seqs(VERDICTS) == list(range(5000))
    assert (pub.acknowledged, pub.dropped, pub.queued) == (5000, 0, 0)


def test_every_verdict_arrives_in_order_across_a_broker_restart(broker_factory, subscribe, publisher):
    # Persistence keeps the subscriber's session, and what the broker held for it when it stopped, across
    # the restart; the subscriber is back before the publisher. A loss can only come from the publisher.
    broker = broker_factory(persistence=True)
    first = subscribe(broker, persistent=True)
    pub = publisher(broker.port)
    assert pub.wait_connected(5)
    total, heatmaps_while_down = 3000, []
    call_s: list[float] = []
    for seq in range(total):
        if seq == 1000:
            failures = pub.connect_failures
            broker.stop()
            first.close()
        if seq == 2000:
            assert not pub.connected and pub.queued > 0
            start_before_the_publisher_reconnects(broker, pub, failures)
            second = subscribe(broker, persistent=True, client_id=first.client_id)
            assert not pub.connected, "the publisher was back before the subscriber: the test's premise broke"
        started = time.perf_counter()
        pub.publish(VERDICTS, verdict(seq), qos=1)
        if seq % 10 == 0:
            if not pub.connected:
                heatmaps_while_down.append(seq)
            heatmap(pub, seq)
        call_s.append(time.perf_counter() - started)
        time.sleep(0.0005)
    assert pub.flush(15), f"{pub.queued} messages still unacknowledged"
    sessions = [first, second]

    def received_seqs() -> list[int]:
        return [seq for each in sessions for seq in each.seqs(VERDICTS)]

    def missing() -> list[int]:
        return sorted(set(range(total)) - set(received_seqs()))

    arrived = second.wait_until(lambda: not missing(), 30)
    stalled: list[int] = []
    if not arrived:
        # Seen once in a full run on a loaded machine (Mosquitto 2.0.11): the broker had acknowledged every
        # verdict, but its last ~90 did not reach the online persistent subscriber within 30 s. The publisher's
        # part ends at the broker's PUBACK; a new connection of the same session tells a publisher's loss (still
        # missing) from a broker that held them without sending (they arrive now, in order).
        stalled = missing()
        second.close()
        sessions.append(subscribe(broker, persistent=True, client_id=first.client_id))
        arrived = sessions[-1].wait_until(lambda: not missing(), 30)
    lost = missing()
    assert arrived, (
        f"{len(lost)} verdicts lost, first {lost[:20]} ({len(stalled)} had not arrived after 30 s); "
        f"broker log:\n{broker.log_tail(30)}"
    )
    time.sleep(0.2)
    received = received_seqs()
    first_arrivals = list(dict.fromkeys(received))
    # QoS 1 allows redelivery: paho resends what was unacknowledged when the broker went away (at most the
    # in-flight window, 20) and the broker resends to each resumed subscriber session what it had in flight
    # there (20 each). A full run once counted 41 against that sum of 40 (no stalled session), so the bound
    # allows one window more: it is here to catch redelivery without end, not to count PUBACK races.
    duplicates = len(received) - len(first_arrivals)
    windows = 1 + (len(sessions) - 1) + 1  # the publisher, each resumed subscriber session, one for the races
    assert duplicates <= 20 * windows, f"{duplicates} duplicates: more than QoS 1 redelivery explains"
    assert first_arrivals == list(range(total))
    assert pub.dropped == 0 and pub.acknowledged >= total
    # A call that waited for the broker would take ~1 s (paho's reconnect wait) for every message of the outage;
    # a scheduler hiccup on a loaded 2-core machine can stall one call for a moment.
    slow = sorted(call_s)[-30:]
    assert slow[0] < 0.05 and slow[-1] < 1.0, f"slowest publish calls: {[round(s, 3) for s in slow]}"
    # paho drops QoS 0 messages given to it while disconnected; ours waited in the local queue.
    assert len(heatmaps_while_down) > 50
    # A stalled session (above) loses the QoS 0 heatmaps the broker held for it when it is replaced, as QoS 0
    # allows: those published before the first verdict that stalled must still have arrived.
    expected = [seq for seq in heatmaps_while_down if not stalled or seq < stalled[0]]
    assert set(expected) <= {seq for each in sessions for seq in each.seqs(HEATMAPS)}


def late_subscriber_reads(broker: MosquittoBroker, topic: str) -> AgentStatus:
    """The retained message on `topic`, read by mosquitto_sub as a separate program connecting now."""
    mosquitto_sub = find_program("mosquitto_sub")
    if mosquitto_sub is None:
        pytest.skip("mosquitto_sub is not installed (apt-get install mosquitto-clients)")
    command = [mosquitto_sub, "-h", broker.host, "-p", str(broker.port), "-t", topic, "-C", "1", "-W", "5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True)
    return decode(AgentStatus, done.stdout.strip().encode())


def test_the_retained_status_reaches_a_late_subscriber_and_close_replaces_it(broker, publisher):
    pub = publisher(broker.port)
    pub.publish(STATUS, status(online=True, model="brick@1.0.0"), qos=1, retain=True)
    assert pub.wait_connected(5) and pub.flush(5)
    assert late_subscriber_reads(broker, STATUS) == status(online=True, model="brick@1.0.0")
    pub.close(offline_status=status(online=False, reason="shutdown"))
    # A clean DISCONNECT: the broker does not publish the will ("connection lost") over it.
    assert late_subscriber_reads(broker, STATUS) == status(online=False, reason="shutdown")
    with pytest.raises(MqttError, match="closed"):
        pub.publish(VERDICTS, verdict(0), qos=1)


def test_the_retained_status_is_published_again_after_a_reconnect(broker, publisher):
    # A broker restarted without persistence forgets retained messages (after a network loss, the will
    # would have replaced it): the publisher sends its latest status again on every reconnect.
    pub = publisher(broker.port)
    pub.publish(STATUS, status(online=True), qos=1, retain=True)
    assert pub.wait_connected(5) and pub.flush(5)
    broker.stop()
    broker.start()
    assert wait_for(lambda: not pub.connected, 5) and pub.wait_connected(10) and pub.flush(5)
    assert late_subscriber_reads(broker, STATUS) == status(online=True)


PUBLISHER_SCRIPT = """
import sys, time
from lineguard.agent.config import MqttConfig
from lineguard.agent.contract import AgentStatus
from lineguard.agent.mqtt import MqttPublisher
def status(online, reason=""):
    return AgentStatus(agent_id="agent-1", line="line-1", online=online, reason=reason, ts=time.time())
config = MqttConfig(port=int(sys.argv[1]), keepalive_s=60)
will = status(False, "connection lost")
pub = MqttPublisher(config, client_id="will-test", status_topic=sys.argv[2], will=will)
pub.publish(sys.argv[2], status(True), qos=1, retain=True)
assert pub.wait_connected(5) and pub.flush(5), "publisher could not connect"
print("ready", flush=True)
time.sleep(60)
"""


def test_the_last_will_says_offline_when_the_publisher_process_is_killed(broker, subscribe, tmp_path):
    subscriber = subscribe(broker, STATUS)
    command = [sys.executable, "-c", PUBLISHER_SCRIPT, str(broker.port), STATUS]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        assert subscriber.wait_until(lambda: len(subscriber.messages) == 1, 5)
        process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        # keepalive is 60 s: the will comes from the closed socket, not from a keepalive timeout.
        assert subscriber.wait_until(lambda: len(subscriber.messages) == 2, 5)
        will_after_s = time.monotonic() - killed_at
    finally:
        process.kill()
        process.wait(timeout=5)
    first, will = subscriber.records(STATUS, AgentStatus)
    assert first.online and (first.agent_id, first.line) == ("agent-1", "line-1")
    assert not will.online and will.agent_id == "agent-1" and will.reason == "connection lost"
    assert will_after_s < 2.0


def test_tls_with_a_ca_and_a_client_certificate_delivers(tls_broker, subscribe, publisher):
    tls = tls_broker.tls
    subscriber = subscribe(tls_broker, VERDICTS, tls=tls)
    pub = publisher(tls_broker.port, tls_ca=tls.ca_cert, tls_cert=tls.client_cert, tls_key=tls.client_key)
    assert pub.wait_connected(5)
    pub.publish(VERDICTS, verdict(7), qos=1)
    assert pub.flush(5)
    assert subscriber.wait_until(lambda: len(subscriber.messages) == 1, 5)
    assert subscriber.seqs(VERDICTS) == [7]


def test_a_plain_client_on_the_tls_port_never_connects_and_says_why(tls_broker, publisher, caplog):
    # Mosquitto sends no CONNACK and no error to a plain client: it hangs up; only a timeout tells.
    caplog.set_level(logging.WARNING, logger="lineguard.agent.mqtt")
    started = time.monotonic()
    pub = publisher(tls_broker.port)
    assert not pub.wait_connected(1.0)
    assert time.monotonic() - started < 2.0
    pub.publish(VERDICTS, verdict(0), qos=1)
    assert pub.queued == 1 and not pub.connected and pub.connect_failures >= 1
    assert "closed the connection before accepting it" in caplog.text and "mqtt.tls_ca" in caplog.text


def test_a_broker_certificate_from_another_ca_is_refused_with_the_reason_logged(
    tls_broker, publisher, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="lineguard.agent.mqtt")
    other = make_tls_files(tmp_path / "other-ca")
    pub = publisher(tls_broker.port, tls_ca=other.ca_cert, tls_cert=other.client_cert, tls_key=other.client_key)
    assert not pub.wait_connected(1.0)
    assert "certificate verify failed" in caplog.text


def test_missing_tls_files_raise_mqtt_error_naming_the_setting(tmp_path):
    config = MqttConfig(tls_ca=tmp_path / "absent-ca.crt")
    with pytest.raises(MqttError, match=r"mqtt\.tls_ca=.*absent-ca\.crt"):
        MqttPublisher(config, client_id="x", status_topic=STATUS, will=None)


def test_a_username_and_password_connect_and_a_wrong_password_is_refused_with_a_logged_reason(
    broker_factory, publisher, caplog
):
    caplog.set_level(logging.INFO, logger="lineguard.agent.mqtt")
    broker = broker_factory(users={"line-1": "s3cret"})
    good = publisher(broker.port, username="line-1", password="s3cret")
    assert good.wait_connected(5)
    good.publish(VERDICTS, verdict(0), qos=1)
    assert good.flush(5)
    bad = publisher(broker.port, username="line-1", password="wrong")
    assert not bad.wait_connected(1.0)
    refused = [r for r in caplog.records if r.levelno == logging.ERROR and "refused the connection" in r.message]
    assert refused, caplog.text
    assert "Not authorized" in refused[0].message and "mqtt.password" in refused[0].message
    assert len(refused) == 1 and "closed the connection" not in caplog.text


def test_a_full_queue_drops_the_oldest_heatmaps_first_and_delivers_the_rest_in_order(
    broker_factory, subscribe, publisher, caplog
):
    caplog.set_level(logging.WARNING, logger="lineguard.agent.mqtt")
    broker = broker_factory()
    broker.stop()  # the publisher starts while the broker is away
    pub = publisher(broker.port, max_queued=100)
    sent: list[tuple[str, int]] = []

    def send(topic: str, seq: int) -> None:
        if topic == VERDICTS:
            pub.publish(topic, verdict(seq), qos=1)
        else:
            heatmap(pub, seq)
        sent.append((topic, seq))

    for seq in range(40):  # 40 verdicts and 40 heatmaps, interleaved
        send(VERDICTS, seq)
        send(HEATMAPS, seq)
    for seq in range(40, 60):
        send(VERDICTS, seq)
    assert (pub.queued, pub.dropped) == (100, 0)
    for seq in range(60, 95):  # each evicts the oldest heatmap: 0..34
        send(VERDICTS, seq)
    assert (pub.queued, pub.dropped) == (100, 35)
    assert "dropped the oldest QoS 0 message" in caplog.text
    start_before_the_publisher_reconnects(broker, pub, 0)
    subscriber = subscribe(broker)
    assert pub.flush(10)
    assert subscriber.wait_until(lambda: len(subscriber.messages) >= 100, 10)
    time.sleep(0.1)
    # Order holds per topic: Mosquitto sends QoS 0 at once but holds QoS 1 beyond a subscriber's 20 in
    # flight, so a heatmap can overtake verdicts queued before it (MQTT orders only within a topic).
    assert subscriber.seqs(VERDICTS) == [seq for topic, seq in sent if topic == VERDICTS] == list(range(95))
    assert subscriber.seqs(HEATMAPS) == list(range(35, 40))


def test_a_queue_full_of_verdicts_refuses_new_messages_with_a_count_and_a_warning(publisher, caplog):
    caplog.set_level(logging.WARNING, logger="lineguard.agent.mqtt")
    pub = publisher(free_port(), max_queued=100)  # nothing listens there
    for seq in range(100):
        pub.publish(VERDICTS, verdict(seq), qos=1)
    pub.publish(VERDICTS, verdict(100), qos=1)
    pub.publish_bytes(HEATMAPS, b"\xff\xd8 jpeg", qos=0)
    assert (pub.queued, pub.dropped, pub.acknowledged) == (100, 2, 0)
    assert f"refused a new message on {VERDICTS}" in caplog.text
    started = time.monotonic()
    pub.close(flush_timeout_s=0.2)
    assert time.monotonic() - started < 3.0, "close must not hang while the broker is unreachable"
    assert "not acknowledged" in caplog.text
