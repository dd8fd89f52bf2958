"""deploy/mosquitto/acl.conf.example enforced by a real Mosquitto: only operators push, agents stay in their lane.

Also pins what Mosquitto 2.0.11 tells a client it refuses (see deploy/mosquitto/README.md).
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from broker import INSTALL_HINT, MosquittoBroker, find_program
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from lineguard.agent.config import MqttConfig
from lineguard.agent.contract import ANY, Topics
from lineguard.agent.rollout.receiver import BundleReceiver
from lineguard.agent.rollout.wire import TransferError
from lineguard.deploy.sender import BundleSender

ACL_EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "acl.conf.example"
PASSWORDS = {"operator": "operator-secret", "agent-1": "agent-1-secret", "agent-2": "agent-2-secret"}
NOT_AUTHORIZED = 0x87
T = Topics("lineguard")


def verdict(agent: str, line: str = "line-1") -> str:
    return T.verdict(line, agent, "top")


def heatmap(agent: str, line: str = "line-1") -> str:
    return T.heatmap(line, agent, "top")


def meta(agent: str) -> str:
    return T.push(agent, "t").meta


def chunk(agent: str, index: int = 0) -> str:
    return T.push(agent, "t").chunk(index)


def ack(agent: str) -> str:
    return T.push(agent, "t").ack


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    if find_program("mosquitto") is None:
        pytest.skip(f"mosquitto is not installed: {INSTALL_HINT}")
    with MosquittoBroker(tmp_path_factory.mktemp("acl-broker"), users=PASSWORDS, acl_file=ACL_EXAMPLE) as started:
        yield started


class Client:
    """A paho client that records CONNACK, SUBACK and PUBACK reason codes and every message it receives."""

    def __init__(
        self,
        broker: MosquittoBroker,
        user: str | None,
        *,
        password: str | None = None,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.connack: ReasonCode | None = None
        self._acks: dict[int, ReasonCode] = {}
        self._cond = threading.Condition()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{user}-{uuid.uuid4().hex[:6]}", protocol=protocol
        )
        if user is not None and tls is None:
            self._client.username_pw_set(user, password if password is not None else PASSWORDS[user])
        if tls is not None:
            ca, cert, key = tls
            self._client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda c, u, mid, codes, p: self._record(mid, codes)
        self._client.on_publish = lambda c, u, mid, code, p: self._record(mid, code)
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        with self._cond:
            assert self._cond.wait_for(lambda: self.connack is not None, 5), "no CONNACK"

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        with self._cond:
            self.connack = reason
            self._cond.notify_all()
        if reason.is_failure:
            client.disconnect()  # or paho keeps retrying with the refused credentials

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((message.topic, message.payload))
            self._cond.notify_all()

    def _record(self, mid: int, code: Any) -> None:
        with self._cond:
            self._acks[mid] = code
            self._cond.notify_all()

    def _wait_ack(self, mid: int) -> Any:
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._acks, 5), "no acknowledgement from the broker"
            return self._acks.pop(mid)

    def subscribe(self, topic: str) -> list[ReasonCode]:
        _, mid = self._client.subscribe(topic, qos=1)
        return self._wait_ack(mid)

    def publish(self, topic: str, payload: bytes = b"{}", *, qos: int = 1) -> ReasonCode:
        """The PUBACK's reason code (QoS 1), or paho's "write done" notice (QoS 0)."""
        return self._wait_ack(self._client.publish(topic, payload, qos=qos).mid)

    def received(self, topic: str) -> list[bytes]:
        with self._cond:
            return [payload for each, payload in self.messages if each == topic]

    def wait_for(self, topic: str, timeout_s: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: any(each == topic for each, _ in self.messages), timeout_s)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def clients(broker: MosquittoBroker) -> Iterator[dict[str, Client]]:
    """operator, agent-1 and agent-2 connected with their passwords; operator and agents subscribed as they would."""
    made = {name: Client(broker, name) for name in PASSWORDS}
    assert made["operator"].subscribe("lineguard/#")[0].value == 1
    for agent in ("agent-1", "agent-2"):
        for topic in (T.push(agent, ANY).meta, T.push(agent, ANY).chunk(ANY), T.model_command(agent)):
            assert made[agent].subscribe(topic)[0].value == 1
    yield made
    for client in made.values():
        client.close()


def test_an_anonymous_client_cannot_connect(broker: MosquittoBroker) -> None:
    client = Client(broker, None)
    assert client.connack is not None
    assert client.connack.value == NOT_AUTHORIZED
    client.close()


def test_a_wrong_password_is_refused_as_not_authorized(broker: MosquittoBroker) -> None:
    client = Client(broker, "agent-1", password="guess")
    assert client.connack is not None
    assert client.connack.value == NOT_AUTHORIZED  # 2.0.11 says 0x87, not 0x86 "Bad user name or password"
    client.close()


def test_agent_1_cannot_push_to_agent_2_and_gets_not_authorized_back(clients: dict[str, Client]) -> None:
    agent_1, operator = clients["agent-1"], clients["operator"]
    forged = T.push("agent-2", "0123456789abcdef").meta
    assert agent_1.publish(forged, qos=1).value == NOT_AUTHORIZED  # MQTT 5: a PUBACK with 0x87
    assert not agent_1.publish(forged, qos=0).is_failure  # QoS 0: dropped without a word
    assert agent_1.publish(T.status("agent-1")).value == 0  # still connected, and in order after them
    assert operator.wait_for(T.status("agent-1"))
    assert operator.received(forged) == []
    assert clients["agent-2"].received(forged) == []


def test_a_mqtt_3_1_1_publisher_is_told_success_when_refused(
    broker: MosquittoBroker, clients: dict[str, Client]
) -> None:
    old = Client(broker, "agent-1", protocol=MQTTProtocolVersion.MQTTv311)
    forged = T.push("agent-2", "0123456789abcdef").chunk(0)
    assert not old.publish(forged).is_failure  # MQTT 3.1.1 PUBACK has no reason code: silently dropped
    assert old.publish(T.status("agent-1")).value == 0
    assert clients["operator"].wait_for(T.status("agent-1"))
    assert clients["operator"].received(forged) == []
    old.close()


def test_agent_1_may_subscribe_to_everything_but_receives_only_its_own_pushes(
    broker: MosquittoBroker, clients: dict[str, Client]
) -> None:
    nosy = Client(broker, "agent-1")
    assert nosy.subscribe("lineguard/#")[0].value == 1  # 2.0.11 grants the subscription and filters on delivery
    for topic in (meta("agent-2"), verdict("agent-1"), meta("agent-1")):
        assert not clients["agent-1" if topic == verdict("agent-1") else "operator"].publish(topic).is_failure
    assert nosy.wait_for(meta("agent-1"))
    assert [topic for topic, _ in nosy.messages] == [meta("agent-1")]
    nosy.close()


@pytest.mark.parametrize(
    ("user", "topic", "allowed"),
    [
        ("operator", meta("agent-1"), True),
        ("operator", chunk("agent-2", 3), True),
        ("operator", T.model_command("agent-1"), True),
        ("operator", T.status("agent-1"), False),  # operators cannot speak for agents
        ("operator", T.model_events("agent-1"), False),
        ("operator", verdict("agent-1"), False),
        ("agent-1", T.status("agent-1"), True),
        ("agent-1", T.model_events("agent-1"), True),
        ("agent-1", ack("agent-1"), True),
        ("agent-1", verdict("agent-1"), True),
        ("agent-1", heatmap("agent-1"), True),
        ("agent-1", verdict("agent-2"), False),  # another agent's camera, on its line
        ("agent-1", verdict("agent-2", "line-2"), False),
        ("agent-1", T.status("agent-2"), False),
        ("agent-1", ack("agent-2"), False),
        ("agent-1", meta("agent-1"), False),  # an agent cannot push to itself
        ("agent-1", chunk("agent-1"), False),
        ("agent-1", T.model_command("agent-1"), False),  # nor command itself
        ("agent-2", chunk("agent-1"), False),
        ("agent-2", verdict("agent-2", "line-2"), True),
        ("operator", T.sample_label("agent-1"), True),  # labels are signed commands from operators
        ("agent-1", T.sample("line-1", "agent-1", "top"), True),
        ("agent-1", T.sample_events("agent-1"), True),
        ("agent-1", T.sample("line-1", "agent-2", "top"), False),
        ("agent-1", T.sample_label("agent-1"), False),  # an agent cannot label its own samples
        ("agent-2", T.sample_events("agent-1"), False),
    ],
)
def test_who_may_publish_where(clients: dict[str, Client], user: str, topic: str, allowed: bool) -> None:
    code = clients[user].publish(topic)
    assert code.value == (0 if allowed else NOT_AUTHORIZED), code


def test_the_operator_pushes_to_each_agent_and_only_that_agent_receives_it(clients: dict[str, Client]) -> None:
    for agent in ("agent-1", "agent-2"):
        assert clients["operator"].publish(meta(agent), agent.encode()).value == 0
    for agent, other in (("agent-1", "agent-2"), ("agent-2", "agent-1")):
        assert clients[agent].wait_for(meta(agent))
        assert clients[agent].received(meta(other)) == []


def test_an_agent_hears_the_labels_for_its_own_samples_only(
    broker: MosquittoBroker, clients: dict[str, Client]
) -> None:
    listeners = {agent: Client(broker, agent) for agent in ("agent-1", "agent-2")}
    for client in listeners.values():
        assert client.subscribe(T.sample_label("+"))[0].value == 1  # granted; delivery is filtered by the ACL
    assert clients["operator"].publish(T.sample_label("agent-1"), b"label").value == 0
    assert listeners["agent-1"].wait_for(T.sample_label("agent-1"))
    time.sleep(0.2)
    assert listeners["agent-2"].received(T.sample_label("agent-1")) == []
    for client in listeners.values():
        client.close()


def test_a_whole_push_runs_under_the_acl(broker: MosquittoBroker, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"model_id": "brick", "model_version": "2"}))
    (bundle / "model.onnx").write_bytes(random.Random(1).randbytes(600_000))
    arrived: list[bytes] = []

    def install(path: Path, meta: object) -> tuple[bool, str]:
        arrived.append((path / "model.onnx").read_bytes())
        return True, "installed"

    def config(user: str) -> MqttConfig:
        return MqttConfig(host=broker.host, port=broker.port, username=user, password=PASSWORDS[user])

    receiver = BundleReceiver(
        config("agent-1"),
        agent_id="agent-1",
        staging_dir=tmp_path / "staging",
        on_bundle=install,
        admit=lambda meta: "",  # the broker's ACL is under test here; the operator's signature in test_rollout.py
    )
    assert receiver.wait_subscribed(5)
    try:
        with BundleSender(config("operator")) as sender:
            result = sender.send(bundle, agent_id="agent-1", timeout_s=20)
    finally:
        receiver.close()
    assert result.reason == "installed"
    assert arrived == [(bundle / "model.onnx").read_bytes()]


def test_a_push_with_agent_credentials_fails_fast_with_the_broker_s_refusal(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"model_id": "brick", "model_version": "2"}))
    config = MqttConfig(host=broker.host, port=broker.port, username="agent-1", password=PASSWORDS["agent-1"])
    started = time.monotonic()
    with BundleSender(config) as sender, pytest.raises(TransferError, match="Not authorized") as refused:
        sender.send(bundle, agent_id="agent-2", timeout_s=20)
    assert time.monotonic() - started < 2
    assert "is user agent-1 an operator in the broker's ACL" in str(refused.value)


# -- the certificate variant: CN as user name ----------------------------------------------------------------


class CertBroker(MosquittoBroker):
    """The TLS broker of tests/broker.py (client certificate required) with `use_identity_as_username true`."""

    def _config_text(self, users: dict[str, str] | None, *, persistence: bool) -> str:
        text = super()._config_text(users, persistence=persistence)
        return text.replace("allow_anonymous true", "allow_anonymous false") + "use_identity_as_username true\n"


def client_cert(tls_dir: Path, common_name: str) -> tuple[Path, Path, Path]:
    """(CA, certificate, key) for a client whose certificate's CN is `common_name`, signed by the broker's CA."""
    key, csr, cert, ext = (tls_dir / f"cn-{common_name}.{suffix}" for suffix in ("key", "csr", "crt", "ext"))
    ext.write_text("extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n")
    openssl = find_program("openssl")
    assert openssl is not None
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    signing = ["-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext]
    for command in (
        [openssl, "req", "-new", *ec, "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={common_name}"],
        [openssl, "x509", "-req", "-in", csr, "-CA", tls_dir / "ca.crt", "-CAkey", tls_dir / "ca.key", *signing],
    ):
        subprocess.run([str(part) for part in command], check=True, capture_output=True, timeout=30)
    return tls_dir / "ca.crt", cert, key


def test_with_client_certificates_the_cn_is_the_user_the_acl_names(tmp_path: Path) -> None:
    if find_program("mosquitto") is None:
        pytest.skip(f"mosquitto is not installed: {INSTALL_HINT}")
    with CertBroker(tmp_path / "broker", tls=True, acl_file=ACL_EXAMPLE) as broker:
        tls_dir = broker.workdir / "tls"
        operator = Client(broker, "operator", tls=client_cert(tls_dir, "operator"))
        agent_1 = Client(broker, "agent-1", tls=client_cert(tls_dir, "agent-1"))
        stranger = Client(broker, "stranger", tls=client_cert(tls_dir, "lineguard-test-stranger"))
        try:
            assert [c.connack.value for c in (operator, agent_1, stranger) if c.connack] == [0, 0, 0]
            assert operator.subscribe("lineguard/#")[0].value == 1
            assert operator.publish(meta("agent-1")).value == 0
            assert agent_1.publish(meta("agent-2")).value == NOT_AUTHORIZED
            assert agent_1.publish(T.status("agent-1")).value == 0
            # Any certificate from the CA gets the pattern rights of its CN: here, its own agent topics.
            assert stranger.publish(T.status("lineguard-test-stranger")).value == 0
            assert stranger.publish(meta("agent-1")).value == NOT_AUTHORIZED
            assert operator.wait_for(T.status("agent-1"))
            time.sleep(0.1)
            assert meta("agent-2") not in [topic for topic, _ in operator.messages]
        finally:
            for client in (operator, agent_1, stranger):
                client.close()
