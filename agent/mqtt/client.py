"""The one way Lineguard makes a paho client: MQTT 5, credentials, TLS, reconnect backoff, session and last will.

Used by every process that talks to the broker: the agent's publisher and listeners, `watch`,
`lineguard-deploy` and the line-side services. A username without TLS sends its password in clear,
and anonymous plain MQTT lets anyone on the network publish verdicts: both are logged as warnings.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..config import MqttConfig

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 1  # paho doubles the wait after each failed attempt, up to RECONNECT_MAX_S
RECONNECT_MAX_S = 5
SESSION_EXPIRY_S = 3600  # a persistent session outlives a lost connection this long
CONNECT_TIMEOUT_S = 10.0
_warned: set[tuple[str, int, str]] = set()


class MqttError(Exception):
    """A client cannot be set up (TLS files), cannot connect, or was refused by the broker."""


@dataclass(frozen=True, slots=True)
class Will:
    """The last will: published by the broker when the client vanishes without a clean DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def tls_enabled(config: MqttConfig) -> bool:
    return config.tls_ca is not None or config.tls_cert is not None


def make_client(config: MqttConfig, client_id: str, *, will: Will | None = None) -> mqtt.Client:
    """A configured, unconnected paho client (MQTT 5); MqttError if the TLS files do not load."""
    if not client_id:
        msg = "MQTT client_id must be non-empty: the broker keeps the session under it"
        raise ValueError(msg)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
    client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    if config.username:
        client.username_pw_set(config.username, config.password.get_secret_value() or None)
    if tls_enabled(config):
        ca, cert, key = (str(path) if path else None for path in (config.tls_ca, config.tls_cert, config.tls_key))
        try:
            client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
        except OSError as error:  # ssl.SSLError is an OSError
            msg = f"cannot load TLS files (mqtt.tls_ca={ca}, tls_cert={cert}, tls_key={key}): {error}"
            raise MqttError(msg) from error
    _warn_if_insecure(config)
    return client


def _warn_if_insecure(config: MqttConfig) -> None:
    """One warning per broker and user: a password in clear, or an open broker."""
    key = (config.host, config.port, config.username)
    if tls_enabled(config) or key in _warned:
        return
    _warned.add(key)
    if config.username:
        log.warning(
            "MQTT user %s logs in to %s:%d WITHOUT TLS: the password crosses the network in clear; set mqtt.tls_ca",
            config.username,
            config.host,
            config.port,
        )
    elif config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "MQTT to %s:%d is anonymous and without TLS: anyone on that network can read and forge verdicts; "
            "see README 'Security'",
            config.host,
            config.port,
        )


def connect_properties(*, persistent: bool) -> Properties:
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = SESSION_EXPIRY_S if persistent else 0
    return properties


def start(client: mqtt.Client, config: MqttConfig, *, persistent: bool) -> None:
    """Connect in the background and keep reconnecting (paho's network thread)."""
    client.connect_async(
        config.host,
        config.port,
        config.keepalive_s,
        clean_start=not persistent,
        properties=connect_properties(persistent=persistent),
    )
    client.loop_start()


def stop(client: mqtt.Client) -> None:
    """A clean DISCONNECT (the broker does not publish the will), then stop the network thread."""
    client.disconnect()
    client.loop_stop()


OnMessage = Callable[[str, bytes, Any], None]  # topic, payload, paho properties


class Subscription:
    """A client subscribed to `filters` that hands every message to `on_message` on paho's thread.

    Connected and subscribed when the constructor returns (MqttError after `timeout_s` otherwise);
    re-subscribes after every reconnect. `on_message` must not raise: what it raises is logged and dropped.
    """

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        filters: Sequence[str],
        on_message: OnMessage,
        *,
        persistent: bool = False,
        timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self._filters = [(each, 1) for each in filters]
        self._on_message = on_message
        self._ready = threading.Event()
        self._problem = ""
        self._closing = False
        self.where = f"{config.host}:{config.port}"
        self.client = make_client(config, client_id)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._deliver
        start(self.client, config, persistent=persistent)
        if not self._ready.wait(timeout_s) or self._problem:
            self.close()
            msg = f"broker {self.where}: {self._problem or 'no answer; is it running, and is it a TLS port with mqtt.tls_ca unset?'}"
            raise MqttError(msg)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            hint = "; check mqtt.username and mqtt.password" if reason.value in (0x86, 0x87) else ""
            self._problem = f"refused the connection: {reason}{hint}"
            self._ready.set()
            return
        client.subscribe(self._filters)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: list[Any], properties: Any) -> None:
        refused = [str(code) for code in codes if code.is_failure]
        if refused:
            self._problem = f"refused the subscription to {[name for name, _ in self._filters]}: {', '.join(refused)}"
        self._ready.set()

    def _deliver(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._on_message(message.topic, bytes(message.payload), message.properties)
        except Exception:  # top of paho's callback: a failing handler must not kill the network thread
            log.exception("handler for %s failed; message dropped", message.topic[:200])

    def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos)

    def close(self) -> None:
        self._closing = True
        stop(self.client)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
