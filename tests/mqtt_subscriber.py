"""A test-side MQTT subscriber (a second, independent paho client) that records what arrives.

Payloads are read through the contract (lineguard.agent.contract), as any subscriber should: tests
never spell a topic or a payload key themselves.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from broker import MosquittoBroker, TlsFiles
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from lineguard.agent.contract import HeatmapInfo, Record, Topics, Verdict, decode

R = TypeVar("R", bound=Record)
TOPICS = Topics("lineguard")


class Subscriber:
    """Records every message on `topic` in arrival order; persistent=True keeps its session across reconnects."""

    def __init__(
        self,
        broker: MosquittoBroker,
        topic: str = "lineguard/#",
        *,
        persistent: bool = False,
        tls: TlsFiles | None = None,
        client_id: str = "",
    ) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.properties: list[list[tuple[str, str]]] = []  # MQTT 5 user properties of each message, same order
        self.client_id = client_id or f"sub-{uuid.uuid4().hex[:8]}"
        self._cond = threading.Condition()
        subscribed = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=MQTTProtocolVersion.MQTTv5)
        client.reconnect_delay_set(min_delay=1, max_delay=1)
        if tls is not None:
            client.tls_set(ca_certs=str(tls.ca_cert), certfile=str(tls.client_cert), keyfile=str(tls.client_key))
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        client.on_subscribe = lambda c, u, mid, codes, p: subscribed.set()
        client.on_message = self._on_message
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600 if persistent else 0
        client.connect(broker.host, broker.port, clean_start=not persistent, properties=properties)
        client.loop_start()
        self._client = client
        assert subscribed.wait(5), "the test subscriber could not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        user = list(getattr(message.properties, "UserProperty", None) or [])
        with self._cond:
            self.messages.append((message.topic, message.payload))
            self.properties.append(user)
            self._cond.notify_all()

    def wait_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(done, timeout_s)

    def records(self, topic: str, record_type: type[R]) -> list[R]:
        """Payloads received on exactly `topic`, decoded as `record_type`, in arrival order."""
        with self._cond:
            return [decode(record_type, payload) for each, payload in self.messages if each == topic]

    def verdicts(self, topic: str) -> list[Verdict]:
        return self.records(topic, Verdict)

    def heatmaps(self, topic: str) -> list[tuple[HeatmapInfo, bytes]]:
        """Heatmap images on `topic` with the verdict they belong to (their user properties)."""
        with self._cond:
            pairs = [
                (props, payload)
                for (each, payload), props in zip(self.messages, self.properties, strict=True)
                if each == topic
            ]
        return [(HeatmapInfo.from_user_properties(props), payload) for props, payload in pairs]

    def seqs(self, topic: str) -> list[int]:
        """Sequence numbers of the verdicts (or heatmaps) on `topic`."""
        match = TOPICS.match(topic)
        if match is not None and match.channel.name == "heatmap":
            return [info.seq for info, _ in self.heatmaps(topic)]
        return [verdict.seq for verdict in self.verdicts(topic)]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
