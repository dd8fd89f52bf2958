"""Labels over a real Mosquitto: signed ones are stored beside their sample, everything else is refused or dropped."""

from __future__ import annotations

import os
import time

import pytest
from mqtt_subscriber import Subscriber
from test_samples_store import sample

from lineguard.agent.authority import sign_command
from lineguard.agent.config import AgentConfig, MqttConfig, RolloutConfig, SamplesConfig
from lineguard.agent.contract import SampleLabelResult, Topics
from lineguard.agent.mqtt import MqttPublisher, Subscription
from lineguard.agent.samples.files import find_sample, read_sample
from lineguard.agent.samples.labels import LabelListener, new_label
from lineguard.agent.samples.store import Budgets, SampleStore
from lineguard.agent.signing import generate_key_pair, load_private_key

AGENT = f"agent-{os.getpid()}"
TOPICS = Topics("lineguard")


@pytest.fixture
def labelling(broker, tmp_path):
    labeller, operator = (generate_key_pair(tmp_path / f"{name}.pem") for name in ("labeller", "operator"))
    config = AgentConfig(
        agent_id=AGENT,
        state_dir=tmp_path / "state",
        mqtt=MqttConfig(port=broker.port),
        rollout=RolloutConfig(operator_keys=(operator[1],)),
        samples=SamplesConfig(label_keys=(labeller[1],)),
    )
    store = SampleStore(tmp_path / "state" / "samples", Budgets(10, 2**30))
    for seq in (1, 2, 3):
        store.add(sample(seq))
    events = Subscriber(broker, TOPICS.sample_events(AGENT))
    publisher = MqttPublisher(config.mqtt, client_id=f"t-{AGENT}", status_topic=TOPICS.status(AGENT), will=None)
    listener = LabelListener(config, publisher)
    sender = Subscription(config.mqtt, f"labeller-{AGENT}", [TOPICS.sample_events(AGENT)], lambda *_: None)
    keys = {"labeller": load_private_key(labeller[0]), "operator": load_private_key(operator[0])}
    yield config, listener, sender, events, keys
    sender.close()
    listener.close()
    publisher.close()
    events.close()


def send(sender: Subscription, payload: bytes) -> None:
    sender.publish(TOPICS.sample_label(AGENT), payload, qos=1).wait_for_publish(5)


def results(events: Subscriber) -> list[SampleLabelResult]:
    return events.records(TOPICS.sample_events(AGENT), SampleLabelResult)


def test_signed_labels_are_stored_beside_their_sample_and_answered(labelling):
    config, _listener, sender, events, keys = labelling
    first = sign_command(new_label(AGENT, "top-1", "nok", by="anna", defect_type="crack"), keys["labeller"])
    second = sign_command(new_label(AGENT, "top-2", "ok", by="ben"), keys["operator"])  # operators may label too
    send(sender, first.encode())
    send(sender, second.encode())
    assert events.wait_until(lambda: len(results(events)) == 2, 10)
    assert [(r.request_id, r.outcome) for r in results(events)] == [
        (first.request_id, "stored"),
        (second.request_id, "stored"),
    ]
    root = config.state_dir / "samples"
    label = read_sample(find_sample(root, "top-1")).label  # type: ignore[arg-type]
    assert label is not None and (label.label, label.defect_type, label.by, label.via) == (
        "nok",
        "crack",
        "anna",
        "mqtt",
    )
    assert label.key_id == first.key_id and label.request_id == first.request_id
    assert read_sample(find_sample(root, "top-2")).label.label == "ok"  # type: ignore[arg-type,union-attr]


def test_unsigned_foreign_replayed_and_unknown_labels_are_refused_with_the_reason(labelling):
    config, _listener, sender, events, keys = labelling
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    good = sign_command(new_label(AGENT, "top-3", "ok", by="anna"), keys["labeller"])
    cases = [
        (new_label(AGENT, "top-1", "ok", by="anna"), "not signed"),
        (sign_command(new_label(AGENT, "top-1", "ok", by="eve"), Ed25519PrivateKey.generate()), "does not trust"),
        (sign_command(new_label("press-9", "top-1", "ok", by="anna"), keys["labeller"]), "is for agent press-9"),
        (good, ""),
        (good, "replayed"),
        (sign_command(new_label(AGENT, "top-77", "ok", by="anna"), keys["labeller"]), "is not stored on this agent"),
        (
            sign_command(new_label(AGENT, "top-1", "ok", by="anna", defect_type="crack"), keys["labeller"]),
            "belongs to a nok",
        ),
    ]
    for label, _ in cases:
        send(sender, label.encode())
    assert events.wait_until(lambda: len(results(events)) == len(cases), 10)
    for result, (label, fragment) in zip(results(events), cases, strict=True):
        assert result.request_id == label.request_id
        assert result.outcome == ("stored" if not fragment else "refused"), result
        assert fragment in result.reason
    labelled = {each.name for each in (config.state_dir / "samples").rglob("label.json")}
    assert len(labelled) == 1  # only the good one (top-3)
    assert read_sample(find_sample(config.state_dir / "samples", "top-1")).label is None  # type: ignore[arg-type]


def test_malformed_labels_are_dropped_and_counted_without_an_answer(labelling):
    _config, listener, sender, events, keys = labelling
    send(sender, b"not json")
    send(sender, b'{"v":1,"agent_id":"x"}')
    send(sender, b"x" * 10_000)
    marker = sign_command(new_label(AGENT, "top-1", "unsure", by="anna"), keys["labeller"])
    send(sender, marker.encode())
    assert events.wait_until(lambda: len(results(events)) == 1, 10)
    time.sleep(0.2)
    assert listener.dropped == 3 and results(events)[0].request_id == marker.request_id


def test_a_flood_of_refused_labels_is_answered_only_up_to_its_budget_then_counted(labelling):
    from lineguard.agent.samples.ratelimit import RateLimit

    _config, listener, sender, events, _keys = labelling
    listener._refusal_budget = RateLimit(2)  # REFUSALS_PER_MINUTE is 600: the same rule, smaller
    for _ in range(5):
        send(sender, new_label(AGENT, "top-1", "ok", by="eve").encode())  # unsigned: refused
    assert events.wait_until(lambda: listener.refused == 5, 10)
    time.sleep(0.3)
    assert len(results(events)) == 2 and listener.dropped == 3
