"""MQTT publisher for verdicts, heatmaps and the agent's retained status, with a last will.

Publishing never blocks and never loses a QoS >= 1 message while the broker is away: every message goes
into a bounded local FIFO that a sender thread hands to paho, in order, only while connected and at most
`window` unacknowledged QoS >= 1 messages at a time. What paho 2.2 does on its own (checked against a
restarted Mosquitto) and why the FIFO exists:
- QoS 1 messages given to paho while disconnected are kept (unbounded) and resent after the reconnect,
  with DUP; publish() still returns MQTT_ERR_NO_CONN for many of them.
- QoS 0 messages given to paho while disconnected are dropped (MQTT_ERR_NO_CONN).
- A message published while paho reconnects can overtake the unacknowledged ones it resends at CONNACK.
So after a reconnect the sender waits until paho's resends are acknowledged before handing new messages;
when the FIFO is full the oldest QoS 0 (heatmap) message goes first, then new messages are refused;
every drop is counted and logged (at most one WARNING per 10 s).
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ..config import MqttConfig
from ..contract import AgentStatus, Record
from .client import RECONNECT_MAX_S, RECONNECT_MIN_S, MqttError, Will, make_client, start, stop, tls_enabled

log = logging.getLogger(__name__)

MAX_INFLIGHT = 20  # unacknowledged QoS >= 1 messages; lowered to the broker's Receive Maximum (Mosquitto: 20)
DROP_LOG_INTERVAL_S = 10.0
MAX_PAYLOAD_BYTES = 268_435_455  # MQTT's limit


@dataclass(frozen=True, slots=True)
class _Message:
    seq: int  # publish order across both local queues
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None = None
    tag: object = None  # handed back by take_settled() once the broker acknowledged (QoS 0: paho took it)


class MqttPublisher:
    """One paho client (MQTT 5, persistent session, last will) fed from a bounded local FIFO."""

    def __init__(
        self,
        config: MqttConfig,
        *,
        client_id: str,
        status_topic: str,
        will: AgentStatus | None,
        on_settled: Callable[[object], None] | None = None,
    ) -> None:
        """Connects in the background and keeps reconnecting; raises MqttError if the TLS files do not load.

        will: the retained status the broker publishes on `status_topic` if this client vanishes (None: no will).
        on_settled: called with a message's tag once the broker acknowledged it (QoS 0: paho took it) or refused
        it for good, on the publisher's own threads, under its lock: it must be quick and never publish.
        """
        self._on_settled = on_settled
        _check_topic(status_topic)
        self._config = config
        self._client_id = client_id
        self._status_topic = status_topic
        self._where = f"{config.host}:{config.port}"
        self._cond = threading.Condition()
        self._waiting_acked: deque[_Message] = deque()  # QoS >= 1, not yet given to paho
        self._waiting_heatmaps: deque[_Message] = deque()  # QoS 0, not yet given to paho
        self._outstanding: dict[int, _Message] = {}  # mid -> QoS >= 1 message given to paho, not acknowledged
        self._early_acks: dict[int, ReasonCode] = {}  # acks that arrive before publish() returned their mid
        self._publishing = False
        self._seq = itertools.count()
        self._window = MAX_INFLIGHT
        self._resend_pending = False
        self._connection = 0  # counts successful connects
        self._sent_on = 0  # the connection the last message was handed to paho on
        self._stalled_on = -1  # paho said "no connection" on this connection: wait for the next one
        self._connected = False
        self._connected_event = threading.Event()
        self._closed = False
        self._sender_error: BaseException | None = None
        self._last_status: bytes | None = None
        self._last_problem = ""
        self._dropped = 0
        self._acknowledged = 0
        self._connect_failures = 0
        self._refused = False  # the broker refused the last CONNECT: on_disconnect need not say more
        self._last_drop_log: dict[str, float] = {}

        will_message = None if will is None else Will(status_topic, will.encode())
        # No client.enable_logger(): paho logs an ERROR at every failed reconnect attempt; we log state changes.
        self._client = make_client(config, client_id, will=will_message)
        self._client.max_inflight_messages_set(MAX_INFLIGHT)  # only takes effect before connect()
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-sender", daemon=True)
        self._sender.start()
        start(self._client, config, persistent=True)
        log.info("mqtt client %s connecting to %s (tls: %s)", client_id, self._where, tls_enabled(config))

    # -- caller side: never blocks ------------------------------------------------------------------------

    def publish(self, topic: str, record: Record, *, qos: int, retain: bool = False, tag: object = None) -> None:
        """Queue one contract record (ContractError if it breaks the contract, e.g. too large).

        tag: anything; take_settled() returns it once the broker has the message (or refused it for good)."""
        self.publish_bytes(topic, record.encode(), qos=qos, retain=retain, tag=tag)

    def publish_bytes(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool = False,
        user_properties: list[tuple[str, str]] | None = None,
        content_type: str = "",
        tag: object = None,
    ) -> None:
        """Queue one message; QoS 0 messages are the first dropped when the local queue is full."""
        _check_topic(topic)
        if qos not in (0, 1, 2):
            msg = f"MQTT QoS must be 0, 1 or 2, got {qos!r}"
            raise ValueError(msg)
        if len(payload) > MAX_PAYLOAD_BYTES:
            msg = f"MQTT payload for {topic} is {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}"
            raise ValueError(msg)
        with self._cond:
            if self._closed or self._sender_error is not None:
                msg = f"MQTT publisher {self._client_id} is closed; cannot publish to {topic}"
                raise MqttError(msg) from self._sender_error
            properties = _publish_properties(user_properties, content_type)
            message = _Message(next(self._seq), topic, bytes(payload), qos, retain, properties, tag)
            if topic == self._status_topic and retain:
                self._last_status = message.payload
            self._enqueue(message)

    def _enqueue(self, message: _Message) -> None:
        if len(self._waiting_acked) + len(self._waiting_heatmaps) >= self._config.max_queued:
            full = f"local queue full ({self._config.max_queued} messages, mqtt.max_queued)"
            if not self._waiting_heatmaps:
                self._count_drop("refused", f"{full}: refused a new message on {message.topic}")
                return
            evicted = self._waiting_heatmaps.popleft()
            self._count_drop("evicted", f"{full}: dropped the oldest QoS 0 message, on {evicted.topic}")
        (self._waiting_acked if message.qos else self._waiting_heatmaps).append(message)
        self._cond.notify_all()

    def _count_drop(self, kind: str, what: str) -> None:
        """Count a lost message; log at most one WARNING per kind every DROP_LOG_INTERVAL_S."""
        self._dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log.get(kind, -DROP_LOG_INTERVAL_S) >= DROP_LOG_INTERVAL_S:
            self._last_drop_log[kind] = now
            state = "connected" if self._connected else "unreachable"
            log.warning(
                "mqtt %s; %d messages dropped since start (broker %s %s)", what, self._dropped, self._where, state
            )

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected_event.wait(timeout_s)

    def flush(self, timeout_s: float) -> bool:
        """Wait until no QoS >= 1 message is waiting or unacknowledged (PUBACK received); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._waiting_acked or self._outstanding:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._sender_error is not None:
                    return False
                self._cond.wait(remaining)
        return True

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def queued(self) -> int:
        """Messages held locally: waiting to be sent plus sent and not yet acknowledged."""
        with self._cond:
            return len(self._waiting_acked) + len(self._waiting_heatmaps) + len(self._outstanding)

    @property
    def dropped(self) -> int:
        """Messages given up: evicted or refused by a full queue, or refused by the broker (PUBACK failure)."""
        return self._dropped

    @property
    def acknowledged(self) -> int:
        """QoS >= 1 messages the broker acknowledged."""
        return self._acknowledged

    @property
    def connect_failures(self) -> int:
        """Connection attempts that failed (nothing listening, TLS error, refused); paho waits >= 1 s after each."""
        return self._connect_failures

    def close(self, *, offline_status: AgentStatus | None = None, flush_timeout_s: float = 2.0) -> None:
        """Publish the retained offline status (when given), flush, disconnect."""
        with self._cond:
            if self._closed:
                return
            usable = self._sender_error is None
        if usable and offline_status is not None:
            self.publish(self._status_topic, offline_status, qos=1, retain=True)
        if usable and not self.flush(flush_timeout_s):
            log.warning(
                "closing mqtt client %s with %d messages the broker %s has not acknowledged; they are lost",
                self._client_id,
                self.queued,
                self._where,
            )
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._sender.join(timeout=5.0)
        stop(self._client)  # a clean DISCONNECT: the broker does not publish the will
        log.info(
            "mqtt client %s closed: %d acknowledged, %d dropped", self._client_id, self._acknowledged, self._dropped
        )

    def __enter__(self) -> MqttPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- sender thread -------------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        try:
            while (message := self._next_message()) is not None:
                info = self._client.publish(
                    message.topic,
                    message.payload,
                    qos=message.qos,
                    retain=message.retain,
                    properties=message.properties,
                )
                with self._cond:
                    self._after_publish(message, info)
        except Exception as error:  # top of the thread: make the failure visible to callers
            log.exception("mqtt sender thread failed; nothing more will be published")
            with self._cond:
                self._sender_error = error
                self._cond.notify_all()

    def _next_message(self) -> _Message | None:
        """The oldest queued message once it may be sent (connected, resends done, window open); None on close."""
        with self._cond:
            while not self._closed:
                head = self._head()
                sendable = self._connected and self._stalled_on != self._connection and not self._resend_pending
                if sendable and head is not None and (head.qos == 0 or len(self._outstanding) < self._window):
                    (self._waiting_acked if head.qos else self._waiting_heatmaps).popleft()
                    self._publishing = True
                    self._sent_on = self._connection
                    return head
                self._cond.wait()
            return None

    def _head(self) -> _Message | None:
        acked = self._waiting_acked[0] if self._waiting_acked else None
        heatmap = self._waiting_heatmaps[0] if self._waiting_heatmaps else None
        if acked is None or heatmap is None:
            return acked or heatmap
        return acked if acked.seq < heatmap.seq else heatmap

    def _after_publish(self, message: _Message, info: mqtt.MQTTMessageInfo) -> None:
        self._publishing = False
        early = self._early_acks.pop(info.mid, None)
        self._early_acks.clear()  # the rest were QoS 0 write notifications
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            self._stalled_on = self._sent_on  # paho saw the loss before on_disconnect ran: wait for a reconnect
        if message.qos == 0:
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                self._waiting_heatmaps.appendleft(message)  # paho drops QoS 0 while disconnected: keep it
            elif message.tag is not None and self._on_settled is not None:
                self._on_settled(message.tag)
            return
        # paho keeps a QoS >= 1 message even with MQTT_ERR_NO_CONN and resends it after the reconnect.
        if early is not None:
            self._settle(message, early)
        else:
            self._outstanding[info.mid] = message

    # -- paho's network thread (lock order: paho's locks, then self._cond; never the reverse) ------------------

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        with self._cond:
            message = self._outstanding.pop(mid, None)
            if message is not None:
                self._settle(message, reason)
            elif self._publishing:
                self._early_acks[mid] = reason

    def _settle(self, message: _Message, reason: ReasonCode) -> None:
        if reason.is_failure:
            self._count_drop("broker", f"broker refused a message on {message.topic}: {reason}")
        else:
            self._acknowledged += 1
        if message.tag is not None and self._on_settled is not None:
            self._on_settled(message.tag)  # a refusal is final too: sending it again would be refused again
        if not self._outstanding:
            self._resend_pending = False
        self._cond.notify_all()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        if reason.is_failure:
            self._connect_failures += 1
            self._refused = True
            hint = "; check mqtt.username and mqtt.password" if reason.value in (0x86, 0x87) else ""
            self._report_problem(f"broker {self._where} refused the connection: {reason}{hint}", logging.ERROR)
            return
        with self._cond:
            reconnect = self._connection > 0
            self._connection += 1
            self._connected = True
            self._window = min(MAX_INFLIGHT, getattr(properties, "ReceiveMaximum", MAX_INFLIGHT))
            self._resend_pending = bool(self._outstanding)  # paho resends these right after this callback
            if reconnect and self._last_status is not None and not self._closed:
                # The will may have replaced our retained status while we were away.
                self._enqueue(_Message(next(self._seq), self._status_topic, self._last_status, 1, True))
            held = len(self._waiting_acked) + len(self._waiting_heatmaps) + len(self._outstanding)
            self._cond.notify_all()
        self._last_problem = ""
        self._connected_event.set()
        log.info(
            "mqtt connected to %s (session present: %s, %d messages waiting)", self._where, flags.session_present, held
        )

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        error = sys.exc_info()[1]  # paho calls this inside its `except OSError`
        self._connect_failures += 1
        self._report_problem(f"cannot connect to broker {self._where}: {error or 'unknown error'}", logging.WARNING)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        with self._cond:
            was_connected, self._connected = self._connected, False
            held = len(self._waiting_acked) + len(self._waiting_heatmaps) + len(self._outstanding)
            closing = self._closed
            self._cond.notify_all()
        self._connected_event.clear()
        refused, self._refused = self._refused, False
        if was_connected and not closing:
            log.warning("mqtt connection to %s lost (%s); holding %d messages locally", self._where, reason, held)
        elif not was_connected and not closing and not refused:
            # What a plain client sees on a TLS port: the broker hangs up, no CONNACK, no reason.
            self._connect_failures += 1
            problem = f"broker {self._where} closed the connection before accepting it ({reason})"
            self._report_problem(f"{problem}; is it a TLS port and mqtt.tls_ca unset?", logging.WARNING)

    def _report_problem(self, problem: str, level: int) -> None:
        """Log a connection problem once, not at every reconnect attempt."""
        if problem != self._last_problem:
            self._last_problem = problem
            log.log(level, "%s; retrying every %d-%d s", problem, RECONNECT_MIN_S, RECONNECT_MAX_S)


def _check_topic(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        msg = f"cannot publish to MQTT topic {topic!r}: it must be non-empty, without wildcards"
        raise ValueError(msg)


def _publish_properties(user_properties: list[tuple[str, str]] | None, content_type: str) -> Properties | None:
    if not user_properties and not content_type:
        return None
    properties = Properties(PacketTypes.PUBLISH)
    if user_properties:
        properties.UserProperty = user_properties
    if content_type:
        properties.ContentType = content_type
    return properties
