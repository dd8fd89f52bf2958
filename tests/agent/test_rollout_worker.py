"""The rollout worker's command listener on a real broker: garbage never stops it, and a command counts only
when an operator the agent trusts signed it, for this agent, once."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
import pytest
import zmq
from mqtt_subscriber import Subscriber
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from lineguard.agent.authority import sign_command
from lineguard.agent.config import MqttConfig, RolloutConfig
from lineguard.agent.contract import ModelCommand, ModelEvent, Topics
from lineguard.agent.rollout.worker import RolloutWorker
from lineguard.agent.signing import generate_key_pair, load_private_key, public_key_path


@pytest.fixture
def worker(broker, loop_config, tmp_path):
    key, _ = generate_key_pair(tmp_path / "operator.pem")
    config = loop_config().model_copy(
        update={
            "mqtt": MqttConfig(port=broker.port),
            "rollout": RolloutConfig(operator_keys=(public_key_path(key),)),
        }
    )
    context = zmq.Context()
    made = RolloutWorker(config, context)
    yield made, load_private_key(key)
    made.close()
    context.term()


def rollback(agent: str) -> ModelCommand:
    request_id, nonce = ModelCommand.new_ids()
    return ModelCommand(action="rollback", agent_id=agent, request_id=request_id, issued_ts=time.time(), nonce=nonce)


def test_garbage_on_the_command_topic_is_counted_and_the_next_signed_command_is_answered(broker, worker):
    rollout, operator = worker
    agent = rollout.config.agent_id
    topics = Topics("lineguard")
    events = Subscriber(broker, topics.model_events(agent))
    raw = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    raw.connect(broker.host, broker.port)
    raw.loop_start()
    try:
        garbage = [
            b"\xff\xfe",
            b"[1, 2]",
            b"[" * 100_000 + b"]" * 100_000,
            b'{"v": 1, "action": "' + b"x" * 10_000 + b'"}',
        ]
        for payload in garbage:
            raw.publish(topics.model_command(agent), payload, qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while rollout.dropped < len(garbage) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rollout.dropped == len(garbage)  # each counted (and logged, at most once per 10 s)

        signed = sign_command(rollback(agent), operator)
        raw.publish(topics.model_command(agent), signed.encode(), qos=1).wait_for_publish(5)
        assert events.wait_until(lambda: len(events.messages) >= 1, 20), "the listener stopped answering"
        (answer,) = events.records(topics.model_events(agent), ModelEvent)
        assert answer.request_id == signed.request_id and answer.outcome == "refused"  # no model store: but heard
        assert len(answer.reason) <= 500

        raw.publish(topics.model_command(agent), signed.encode(), qos=1).wait_for_publish(5)  # a recorded replay
        assert events.wait_until(lambda: len(events.messages) >= 2, 20)
        replay = events.records(topics.model_events(agent), ModelEvent)[1]
        assert replay.outcome == "refused" and "replayed" in replay.reason

        unsigned = rollback(agent)
        raw.publish(topics.model_command(agent), unsigned.encode(), qos=1).wait_for_publish(5)
        assert events.wait_until(lambda: len(events.messages) >= 3, 20)
        assert "not signed" in events.records(topics.model_events(agent), ModelEvent)[2].reason
    finally:
        raw.disconnect()
        raw.loop_stop()
        events.close()
