"""`lineguard-ui run` against a real Mosquitto, over real HTTP: what it records, who may change what, bad requests,
signed labels, and a broker outage shown as a banner in a real browser."""

from __future__ import annotations

import base64
import json
import os
import time

import pytest
from mqtt_subscriber import Subscriber
from ui_server import http_login

from lineguard.agent.authority import CommandVerifier
from lineguard.agent.contract import Latency, SampleLabel, SampleLabelResult, SampleRecord, Topics, Verdict
from lineguard.agent.signing import generate_key_pair, load_public_key, public_key_path

TOPICS = Topics("lineguard")
AGENT = f"agent-{os.getpid()}"


def verdict(seq: int, kind: str = "reject") -> Verdict:
    now = time.time()
    return Verdict(
        agent_id=AGENT,
        line="line-1",
        camera="cam0",
        seq=seq,
        capture_ts=now - 0.03,
        decided_ts=now,
        verdict=kind,  # type: ignore[arg-type]
        reason="score 0.61 >= threshold 0.42",
        score=0.61,
        threshold=0.42,
        model="brick@1.0.0",
        latency_ms=Latency(total=30.0),
    )


def publish(subscriber: Subscriber, topic: str, payload: bytes) -> None:
    subscriber._client.publish(topic, payload, qos=1).wait_for_publish(5)


def wait_for(probe, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s")


def test_bad_requests_get_4xx_with_a_reason(broker, ui_factory):
    server = ui_factory(broker)
    cases = [
        ("/api/history?start=10&end=5", 400, "end (5.0) is before start"),
        ("/api/history?start=abc&end=5", 400, "query.start"),
        ("/api/history?start=0&end=5&verdict=maybe", 400, "query.verdict"),
        ("/api/gallery/x/y/1", 404, "not in the gallery"),
        ("/api/frame/nobody/cam0", 404, "no image"),
        ("/api/line/bad%20line/snapshot", 400, "path.line"),
    ]
    for path, code, fragment in cases:
        status, answer = server.request(path)
        assert (status, fragment in answer["detail"]) == (code, True), (path, status, answer)
    status, answer = server.request("/api/alarms/1/ack", data=b"", method="POST")
    assert (status, answer["detail"]) == (401, "log in to acknowledge alarms")
    http_login(server)
    status, answer = server.request("/api/alarms/1/ack", data=b"", method="POST", headers={"X-CSRF-Token": "forged"})
    assert status == 403 and "CSRF" in answer["detail"]
    status, answer = server.request(
        "/api/alarms/1/ack", data=b"", method="POST", headers={"Origin": "http://evil.example"}
    )
    assert status == 403 and "cross-site" in answer["detail"]


def test_a_wrong_password_is_refused_and_the_login_form_needs_its_own_token(broker, ui_factory):
    server = ui_factory(broker)
    status, text = server.request("/login")
    token = text.split('name="csrf_token" value="')[1].split('"')[0]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, text = server.request("/login", data=f"user=anna&password=nope&csrf_token={token}".encode(), headers=form)
    assert status == 401 and "wrong password" in text
    server.cookies.clear()
    status, answer = server.request("/login", data=f"user=anna&password=x&csrf_token={token}".encode(), headers=form)
    assert status == 403 and "expired" in answer["detail"]


def test_a_proxy_header_is_believed_only_when_configured(broker, ui_factory):
    server = ui_factory(broker, users=False, extra='\n[auth]\nproxy_header = "X-Forwarded-User"\n')
    snapshot = server.request("/api/line/line-1/snapshot", headers={"X-Forwarded-User": "ben"})[1]
    assert snapshot["viewer"]["user"] == "ben" and snapshot["viewer"]["csrf"]
    plain = ui_factory(broker, users=False)
    assert plain.request("/api/line/line-1/snapshot", headers={"X-Forwarded-User": "ben"})[1]["viewer"]["user"] == ""


def test_a_label_goes_out_signed_with_the_labeller_key_and_the_agents_answer_is_recorded(broker, ui_factory, tmp_path):
    key, _ = generate_key_pair(tmp_path / "labeller.pem")
    server = ui_factory(broker, label_key=key)
    subscriber = Subscriber(broker, "lineguard/#")
    publish(subscriber, TOPICS.verdict("line-1", AGENT, "cam0"), verdict(7).encode())
    sample = SampleRecord(
        sample_id="s-7",
        agent_id=AGENT,
        line="line-1",
        camera="cam0",
        seq=7,
        kind="reject",
        verdict="reject",
        score=0.61,
        threshold=0.42,
        model="brick@1.0.0",
        capture_ts=time.time(),
        thumbnail_jpeg=base64.b64encode(b"\xff\xd8thumbnail").decode(),
    )
    publish(subscriber, TOPICS.sample("line-1", AGENT, "cam0"), sample.encode())
    wait_for(lambda: server.request(f"/api/gallery/{AGENT}/cam0/7")[0] == 200)
    csrf = http_login(server)
    form = {"agent_id": AGENT, "camera": "cam0", "seq": 7, "label": "nok", "defect_type": "crack"}
    status, sent = server.request("/api/labels", data=form, headers={"X-CSRF-Token": csrf})
    assert status == 200, sent
    topic = TOPICS.sample_label(AGENT)
    wait_for(lambda: subscriber.records(topic, SampleLabel))
    (label,) = subscriber.records(topic, SampleLabel)
    verifier = CommandVerifier(AGENT, [load_public_key(public_key_path(key))], tmp_path / "nonces.json")
    verifier.check(label)  # raises CommandRefused unless signed by the labeller key, for this agent, fresh
    assert (label.sample_id, label.label, label.defect_type, label.by) == ("s-7", "nok", "crack", "anna")
    answer = SampleLabelResult(
        agent_id=AGENT, sample_id="s-7", request_id=label.request_id, outcome="stored", reason="", ts=time.time()
    )
    publish(subscriber, TOPICS.sample_events(AGENT), answer.encode())
    stored = wait_for(lambda: [row for row in server.get("/api/labels") if row["outcome"] == "stored"])
    assert stored[0]["request_id"] == label.request_id
    assert server.get(f"/api/gallery/{AGENT}/cam0/7")["entry"]["label"] == "nok"
    status, answer_text = server.request(
        "/api/labels", data={**form, "defect_type": "Crack!"}, headers={"X-CSRF-Token": csrf}
    )
    assert status == 400 and "defect_type" in answer_text["detail"]
    subscriber.close()


def test_labelling_without_a_labeller_key_or_a_sample_is_refused_with_the_reason(broker, ui_factory):
    server = ui_factory(broker)
    subscriber = Subscriber(broker, "lineguard/#")
    publish(subscriber, TOPICS.verdict("line-1", AGENT, "cam0"), verdict(3).encode())
    wait_for(lambda: server.request(f"/api/gallery/{AGENT}/cam0/3")[0] == 200)
    csrf = http_login(server)
    form = {"agent_id": AGENT, "camera": "cam0", "seq": 3, "label": "ok"}
    status, answer = server.request("/api/labels", data=form, headers={"X-CSRF-Token": csrf})
    assert status == 409 and "label_key" in answer["detail"]
    subscriber.close()


def test_payloads_that_break_the_contract_are_dropped_counted_and_the_feed_goes_on(broker, ui_factory):
    server = ui_factory(broker)
    subscriber = Subscriber(broker, "lineguard/#")
    topic = TOPICS.verdict("line-1", AGENT, "cam0")
    publish(subscriber, topic, b"{not json")
    publish(subscriber, topic, json.dumps({"v": 1, "seq": "x" * 10_000}).encode())
    publish(subscriber, TOPICS.verdict("line-1", "someone-else", "cam0"), verdict(1).encode())  # names another agent
    publish(subscriber, topic, verdict(2, "accept").encode())
    dropped = wait_for(
        lambda: (
            server.get("/api/health")["dropped"].get("malformed-verdict", 0) >= 3
            and server.get("/api/health")["dropped"]
        )
    )
    assert dropped["malformed-verdict"] == 3
    history = wait_for(lambda: server.get(f"/api/history?start=0&end={time.time() + 5}")["rows"])
    assert [Verdict.model_validate(row).seq for row in history] == [2]
    assert "x" * 300 not in server.log_path.read_text()  # nothing echoed at length
    subscriber.close()


@pytest.mark.slow
def test_a_broker_outage_shows_as_a_banner_and_clears_when_it_is_back(broker, ui_factory, page):
    server = ui_factory(broker)
    page.goto(f"{server.url}/line/line-1")
    page.wait_for_selector("#broker.pill.ok")
    broker.stop()
    page.wait_for_selector("#banners .banner.broker", timeout=10_000)
    assert "broker unreachable" in page.inner_text("#banners")
    broker.start()
    page.wait_for_selector("#banners .banner.broker", state="detached", timeout=20_000)
    assert page.inner_text("#broker") == "broker connected"
