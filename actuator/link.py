"""The actuator's broker connection: one paho client from the project's factory, a persistent session, a last will.

Everything that arrives (and every connect or loss) goes into an Inbox with its monotonic arrival time;
the service loop takes it from there. paho's thread does nothing else, so a slow output never holds up
the network and the PUBACKs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from lineguard.agent.config import MqttConfig
from lineguard.agent.mqtt import Will, make_client, start, stop

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Inbound:
    """One message from the broker."""

    topic: str
    payload: bytes
    retained: bool
    at: float  # time.monotonic() on arrival


@dataclass(frozen=True, slots=True)
class Connection:
    """The broker connection came up (connected) or went away."""

    connected: bool
    at: float
    detail: str


Event = Inbound | Connection


class Inbox:
    """A queue the paho thread fills and the service loop drains; put() wakes a waiting take()."""

    def __init__(self) -> None:
        self._items: deque[Event] = deque()
        self._cond = threading.Condition()

    def put(self, item: Event) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def take(self, timeout_s: float) -> list[Event]:
        """Everything queued, waiting up to timeout_s (<= 0: no wait) for the first item."""
        with self._cond:
            if not self._items and timeout_s > 0:
                self._cond.wait(timeout_s)
            items = list(self._items)
            self._items.clear()
            return items


class MqttLink:
    """Subscribed to `filters` (QoS 1) on every connect; a persistent session keeps QoS 1 messages while away."""

    def __init__(self, config: MqttConfig, client_id: str, filters: Sequence[str], inbox: Inbox, *, will: Will) -> None:
        self.where = f"{config.host}:{config.port}"
        self._filters = [(each, 1) for each in filters]
        self._inbox = inbox
        self.connected = threading.Event()
        self.client = make_client(config, client_id, will=will)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        start(self.client, config, persistent=True)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            hint = "; check mqtt.username and mqtt.password" if reason.value in (0x86, 0x87) else ""
            log.error("broker %s refused the connection: %s%s", self.where, reason, hint)
            return
        client.subscribe(self._filters)
        self.connected.set()
        self._inbox.put(Connection(True, time.monotonic(), f"session present: {flags.session_present}"))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self.connected.is_set():
            self.connected.clear()
            self._inbox.put(Connection(False, time.monotonic(), str(reason)))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._inbox.put(Inbound(message.topic, bytes(message.payload), bool(message.retain), time.monotonic()))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """QoS 1; paho keeps it while the broker is away and sends it after the reconnect."""
        self.client.publish(topic, payload, qos=1, retain=retain)

    def close(self, last: tuple[str, bytes] | None = None) -> None:
        """Publish `last` (topic, payload: the retained offline status), then a clean DISCONNECT (no will)."""
        if last is not None and self.connected.is_set():
            info = self.client.publish(last[0], last[1], qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except RuntimeError as error:  # paho: the message was not queued (connection just lost)
                log.warning("could not publish the offline status: %s", error)
        stop(self.client)
