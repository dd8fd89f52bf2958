"""Operator side of a push: BundleSender sends one bundle to one agent, resuming where the agent stands.

See agent/rollout/wire.py for the topics, acks and resume rules; the agent's side is agent/rollout/receiver.py.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from lineguard.agent.config import MqttConfig
from lineguard.agent.contract import (
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    ContractError,
    ModelCommand,
    PushTopics,
    Topics,
    TransferAck,
    TransferMeta,
    decode,
)
from lineguard.agent.mqtt import make_client, stop
from lineguard.agent.mqtt.client import CONNECT_TIMEOUT_S
from lineguard.agent.rollout.archive import pack_bundle, read_model_id
from lineguard.agent.rollout.wire import CHUNK_BYTES, MAX_REFUSALS, WINDOW_CHUNKS, TransferError, expand

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TransferProgress:
    """Where a push stands; given to the progress callback after each chunk the agent confirms."""

    transfer_id: str
    chunks_received: int  # chunks the agent holds
    chunk_count: int
    bytes_received: int
    total_bytes: int
    chunks_sent: int  # by this send()


ProgressCallback = Callable[[TransferProgress], None]


@dataclass(frozen=True, slots=True)
class TransferResult:
    """A push the agent accepted."""

    transfer_id: str
    agent_id: str
    model: str  # id@version
    total_bytes: int
    chunk_count: int
    chunks_sent: int  # by this send(): fewer than chunk_count when the agent already held some (resume)
    elapsed_s: float
    reason: str  # the agent's words


@dataclass
class _Push:
    """The sender's view of one transfer: what the agent holds, what is in flight, what to send next."""

    client: mqtt.Client
    archive: bytes
    meta: TransferMeta
    topics: PushTopics
    window: int
    received: set[int] = field(default_factory=set)
    in_flight: set[int] = field(default_factory=set)  # sent, not yet confirmed by the agent
    to_send: deque[int] = field(default_factory=deque)
    refusals: Counter[int] = field(default_factory=Counter)
    waiting_for_list: bool = True  # asked (meta) and not yet told what is missing: send nothing
    chunks_sent: int = 0

    def ask(self) -> None:
        """Publish meta: the agent answers with the chunks it still needs."""
        self.client.publish(self.topics.meta, self.meta.encode(), qos=1)
        self.waiting_for_list = True
        self.in_flight.clear()
        self.to_send.clear()

    def send_window(self) -> None:
        while not self.waiting_for_list and self.to_send and len(self.in_flight) < self.window:
            index = self.to_send.popleft()
            if index in self.received or index in self.in_flight:
                continue
            start = index * self.meta.chunk_bytes
            self.client.publish(self.topics.chunk(index), self.archive[start : start + self.meta.chunk_bytes], qos=1)
            self.in_flight.add(index)
            self.chunks_sent += 1

    def handle(self, ack: TransferAck) -> bool:
        """Apply one ack; True when it confirmed a new chunk. TransferError when the agent refuses the push."""
        if ack.state == "failed":
            msg = (
                f"agent {self.topics.agent} refused transfer {self.meta.transfer_id} of {self.meta.model}: {ack.reason}"
            )
            raise TransferError(msg, reason=ack.reason)
        if ack.missing is not None and self.waiting_for_list:
            missing = expand(ack.missing, self.meta.chunk_count)
            self.received = set(range(self.meta.chunk_count)) - missing
            self.to_send = deque(sorted(missing))
            self.waiting_for_list = False
        if ack.chunk is None or ack.chunk >= self.meta.chunk_count:
            return False
        self.in_flight.discard(ack.chunk)
        if ack.refused:
            self.refusals[ack.chunk] += 1
            log.warning("agent %s refused chunk %d: %s", self.topics.agent, ack.chunk, ack.refused)
            if self.refusals[ack.chunk] >= MAX_REFUSALS:
                msg = f"agent {self.topics.agent} refused chunk {ack.chunk} {MAX_REFUSALS} times: {ack.refused}"
                raise TransferError(msg, reason=ack.refused)
            self.to_send.appendleft(ack.chunk)
            return False
        new = ack.chunk not in self.received
        self.received.add(ack.chunk)
        return new

    def progress(self) -> TransferProgress:
        meta, count = self.meta, len(self.received)
        short_last = meta.chunk_bytes - meta.chunk_length(meta.chunk_count - 1)
        received_bytes = count * meta.chunk_bytes - (short_last if meta.chunk_count - 1 in self.received else 0)
        return TransferProgress(
            meta.transfer_id, count, meta.chunk_count, received_bytes, meta.total_bytes, self.chunks_sent
        )


_RECONNECTED = object()  # queued by on_connect after a reconnect: ask the agent again


@dataclass(frozen=True, slots=True)
class _BrokerRefusal:
    """A PUBACK with a failure code: Mosquitto 2.0 answers a publish its ACL denies with 0x87 (MQTT 5)."""

    reason: str


class BundleSender:
    """Operator side: one paho client (MQTT 5, clean session) that pushes bundles to agents, one at a time."""

    def __init__(
        self,
        config: MqttConfig,
        *,
        client_id: str = "",
        chunk_bytes: int = CHUNK_BYTES,
        window_chunks: int = WINDOW_CHUNKS,
        ask_interval_s: float = 5.0,
    ) -> None:
        """Connect (waits up to CONNECT_TIMEOUT_S); TransferError if the broker is unreachable or refuses us.

        window_chunks: chunks sent and not yet confirmed by the agent; ask_interval_s: silence after which the
        sender publishes meta again to learn what is missing."""
        if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
            msg = f"chunk_bytes must be in {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}, got {chunk_bytes}"
            raise ValueError(msg)
        if not 1 <= window_chunks <= 64 or ask_interval_s <= 0:
            msg = f"window_chunks must be in 1..64 and ask_interval_s > 0, got {window_chunks}, {ask_interval_s}"
            raise ValueError(msg)
        self._topics = Topics(config.topic_prefix)
        self._chunk_bytes, self._window, self._ask_interval_s = chunk_bytes, window_chunks, ask_interval_s
        self._where = f"{config.host}:{config.port}"
        self._inbox: queue.Queue[object] = queue.Queue()
        self._ack_topic: str | None = None
        self._connected, self._subscribed = threading.Event(), threading.Event()
        self._problem = ""
        self._client = make_client(config, client_id or f"lineguard-push-{uuid.uuid4().hex[:8]}")
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._closing = False
        self._user = config.username
        try:
            self._client.connect(config.host, config.port, config.keepalive_s)
        except OSError as error:
            msg = f"cannot connect to broker {self._where}: {error}"
            raise TransferError(msg) from error
        self._client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT_S) or self._problem:
            self.close()
            msg = f"broker {self._where}: {self._problem or 'no CONNACK; a TLS port and mqtt.tls_ca unset?'}"
            raise TransferError(msg)

    def send(
        self,
        bundle_dir: Path,
        *,
        agent_id: str,
        timeout_s: float = 600.0,
        progress: ProgressCallback | None = None,
        command: Callable[[TransferMeta], ModelCommand | None] | None = None,
    ) -> TransferResult:
        """Push the bundle to `agent_id`; return once the agent has verified and accepted it.

        Raises TransferError (the agent refused it: `.reason` holds why; or no verdict within timeout_s),
        BundleError (no readable manifest), ArchiveError (links or special files in the bundle). An exception
        raised by `progress` stops the push; a later send() of the same bundle resumes it. `command` makes the
        operator's signed push command for the meta (see deploy/commands.py)."""
        if timeout_s <= 0:
            msg = f"timeout_s must be > 0, got {timeout_s}"
            raise ValueError(msg)
        model_id, model_version = read_model_id(bundle_dir)
        archive = pack_bundle(bundle_dir)
        meta = TransferMeta.for_archive(
            archive, model_id=model_id, model_version=model_version, chunk_bytes=self._chunk_bytes
        )
        if command is not None:
            meta = meta.model_copy(update={"command": command(meta)})
        topics = self._topics.push(agent_id, meta.transfer_id)
        log.info(
            "pushing %s to %s as transfer %s: %d bytes in %d chunks",
            meta.model,
            agent_id,
            meta.transfer_id,
            meta.total_bytes,
            meta.chunk_count,
        )
        try:
            self._subscribe(topics.ack)
            return self._run(_Push(self._client, archive, meta, topics, self._window), timeout_s, progress)
        finally:
            self._ack_topic = None
            self._client.unsubscribe(topics.ack)

    def _run(self, push: _Push, timeout_s: float, progress: ProgressCallback | None) -> TransferResult:
        started = heard = time.monotonic()
        deadline = started + timeout_s
        push.ask()
        while True:
            push.send_window()
            now = time.monotonic()
            if now >= deadline:
                msg = (
                    f"agent {push.topics.agent} gave no verdict on transfer {push.meta.transfer_id} within "
                    f"{timeout_s:g} s ({len(push.received)}/{push.meta.chunk_count} chunks confirmed); is it online "
                    f"and may this user publish to {push.topics.meta}?"
                )
                raise TransferError(msg, timed_out=True)
            try:
                item = self._inbox.get(timeout=min(deadline, heard + self._ask_interval_s) - now)
            except queue.Empty:
                item = None
            if isinstance(item, _BrokerRefusal):
                msg = (
                    f"broker {self._where} refused our publish to {push.topics.meta}: {item.reason}; "
                    f"is user {self._user or '(anonymous)'} an operator in the broker's ACL (deploy/mosquitto/README.md)?"
                )
                raise TransferError(msg, reason=item.reason)
            if not isinstance(item, TransferAck):
                why = "reconnected" if item is _RECONNECTED else f"no answer for {self._ask_interval_s:g} s"
                log.info(
                    "transfer %s: %s; asking %s which chunks it lacks", push.meta.transfer_id, why, push.topics.agent
                )
                push.ask()
                heard = time.monotonic()
                continue
            if item.transfer_id != push.meta.transfer_id:
                continue
            heard = time.monotonic()
            if push.handle(item) and progress is not None:
                progress(push.progress())
            if item.state == "received":
                elapsed_s = time.monotonic() - started
                log.info(
                    "agent %s accepted %s in %.1f s: %s", push.topics.agent, push.meta.model, elapsed_s, item.reason
                )
                meta = push.meta
                return TransferResult(
                    meta.transfer_id,
                    push.topics.agent,
                    meta.model,
                    meta.total_bytes,
                    meta.chunk_count,
                    push.chunks_sent,
                    elapsed_s,
                    item.reason,
                )

    def _subscribe(self, topic: str) -> None:
        while not self._inbox.empty():  # answers left over from an earlier push
            self._inbox.get_nowait()
        self._subscribed.clear()
        self._problem = ""
        self._ack_topic = topic
        self._client.subscribe(topic, qos=1)
        if not self._subscribed.wait(CONNECT_TIMEOUT_S) or self._problem:
            msg = f"broker {self._where} did not grant a subscription to {topic}: {self._problem or 'no SUBACK'}"
            raise TransferError(msg)

    def close(self) -> None:
        self._closing = True
        stop(self._client)

    def __enter__(self) -> BundleSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- paho's network thread ------------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            hint = "; check mqtt.username and mqtt.password" if reason.value in (0x86, 0x87) else ""
            self._problem = f"refused the connection: {reason}{hint}"
            self._connected.set()
            return
        reconnect = self._connected.is_set()
        self._connected.set()
        if self._ack_topic is not None:
            client.subscribe(self._ack_topic, qos=1)
            if reconnect:
                self._inbox.put(_RECONNECTED)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: list[Any], properties: Any) -> None:
        if any(code.is_failure for code in codes):
            self._problem = ", ".join(str(code) for code in codes)
        self._subscribed.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if reason.is_failure and self._ack_topic is not None:
            self._inbox.put(_BrokerRefusal(str(reason)))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not self._closing:
            log.warning("connection to broker %s lost (%s); reconnecting", self._where, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic != self._ack_topic:
            return
        try:
            self._inbox.put(decode(TransferAck, message.payload))
        except ContractError as error:
            log.warning("ignoring a malformed ack on %s: %s", message.topic, error)
