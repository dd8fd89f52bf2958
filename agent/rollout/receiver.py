"""Agent side of a push: BundleReceiver stages chunks on disk, checks and unpacks the archive, hands it on.

See agent/rollout/wire.py for the topics, acks and resume rules.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt

from lineguard.agent.bundle import file_sha256
from lineguard.agent.config import MqttConfig
from lineguard.agent.contract import (
    ANY,
    MAX_CHUNK_BYTES,
    ContractError,
    ModelEvent,
    PushTopics,
    ShadowResult,
    Topics,
    TransferAck,
    TransferMeta,
    TransferState,
    clip,
    decode,
)
from lineguard.agent.mqtt import make_client, start, stop
from lineguard.agent.rollout.archive import unpack_bundle
from lineguard.agent.rollout.staging import StagingLimits, _Incoming, _load_staged, _remove
from lineguard.agent.rollout.wire import INBOX_MAX_BYTES, ArchiveError, as_ranges

DROP_LOG_INTERVAL_S = 10.0

log = logging.getLogger(__name__)


class BundleOutcome(NamedTuple):
    """on_bundle's answer: accepted or not, why, and the shadow phase's numbers when there was one."""

    ok: bool
    reason: str
    shadow: ShadowResult | None = None


OnBundle = Callable[[Path, TransferMeta], tuple[bool, str] | BundleOutcome]
Admit = Callable[[TransferMeta], str]  # why a new transfer is refused before anything is staged; "" = admitted


class BundleReceiver:
    """Agent side: its own paho client (MQTT 5, persistent session) and one worker thread that stages pushes.

    Connects with the agent's MqttConfig (host, credentials, TLS, topic_prefix) as client id
    `<mqtt.client_id or lineguard-<agent_id>>-deploy`, in the background, reconnecting on its own; subscribes to
    `<prefix>/<agent_id>/model/push/+/meta` and `.../+/chunk/+`. It owns `staging_dir`: one folder per transfer
    (archive.tar, meta.json, transfer.json), resumed from disk when a receiver starts. A new transfer is staged
    only when `admit(meta)` (the operator's signed push command) and the staging limits allow it, so unsigned
    traffic never reaches the disk. When an archive is complete, its sha256 checked and unpacked at
    staging_dir/<transfer_id>/bundle, `on_bundle(path, meta) -> (ok, reason)` runs on the worker thread (it may
    take its time; move or copy what it keeps: the folder is deleted when it returns) and its answer is the
    verdict published on the ack and events topics.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        agent_id: str,
        staging_dir: Path,
        on_bundle: OnBundle,
        admit: Admit,
        limits: StagingLimits | None = None,
    ) -> None:
        self._topics = Topics(config.topic_prefix)
        self._subscriptions = self._topics.push(agent_id, ANY)  # ContractError for an agent id that is no level
        self._agent_id = agent_id
        self._staging_dir = staging_dir
        self._on_bundle, self._admit = on_bundle, admit
        self._limits = limits or StagingLimits()
        self._abandon_after_s = self._limits.timeout_s
        self._sweep_interval_s = min(self._abandon_after_s / 4, 5.0)
        self.dropped = 0  # messages refused before the worker saw them
        self._last_drop_log = -DROP_LOG_INTERVAL_S
        staging_dir.mkdir(parents=True, exist_ok=True)
        self._transfers = _load_staged(staging_dir, self._limits)  # only the worker thread touches it after this
        self._shadows: dict[str, ShadowResult] = {}  # transfer id -> its swap's shadow numbers, while it is kept
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._inbox_bytes = 0
        self._lock = threading.Lock()  # guards _inbox_bytes
        self._subscribed = threading.Event()
        self._client = make_client(config, f"{config.client_id or 'lineguard-' + agent_id}-deploy")
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._closing = False
        self._client.on_message = self._on_message
        self._worker = threading.Thread(target=self._work, name="bundle-receiver", daemon=True)
        self._worker.start()
        start(self._client, config, persistent=True)
        log.info("bundle receiver %s: staging in %s, %d transfers on disk", agent_id, staging_dir, len(self._transfers))

    def wait_subscribed(self, timeout_s: float) -> bool:
        """True once the broker granted the push subscriptions (pushes before that wait in the broker's session)."""
        return self._subscribed.wait(timeout_s)

    def missing_chunks(self, transfer_id: str) -> list[int] | None:
        """Chunk indices the staged transfer still needs, from its chunk map on disk; None if none is staged."""
        self._topics.push(self._agent_id, transfer_id)  # ContractError for a name that is no folder of ours
        try:
            return sorted(_Incoming.load(self._staging_dir / transfer_id).missing())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def close(self, *, timeout_s: float = 30.0) -> None:
        """Finish the messages already received, then disconnect (the broker keeps the session for later ones)."""
        self._closing = True
        self._inbox.put(None)
        self._worker.join(timeout_s)
        if self._worker.is_alive():
            log.warning("bundle receiver still busy after %g s (in on_bundle?); disconnecting anyway", timeout_s)
        stop(self._client)

    def __enter__(self) -> BundleReceiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- paho's network thread: only hand messages to the worker -----------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("bundle receiver: broker refused the connection: %s; check mqtt.username/password", reason)
            return
        log.info("bundle receiver connected (session present: %s)", flags.session_present)
        client.subscribe([(self._subscriptions.meta, 1), (self._subscriptions.chunk(ANY), 1)])

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._subscribed.clear()
        if not self._closing:
            log.warning("bundle receiver lost its broker connection (%s); reconnecting", reason)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: list[Any], properties: Any) -> None:
        if any(code.is_failure for code in codes):
            log.error("bundle receiver: broker refused the subscriptions to %s: %s", self._subscriptions.meta, codes)
        else:
            self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """paho's thread: bound what is queued for the worker (metas and chunks alike); never raises."""
        size = len(message.payload)
        limit = TransferMeta.MAX_BYTES if message.topic.endswith("/meta") else MAX_CHUNK_BYTES
        with self._lock:
            if size > limit:
                self._drop(f"{size}-byte message on {clip(message.topic, 200)} is over the {limit}-byte limit")
                return
            if self._inbox_bytes + size > INBOX_MAX_BYTES:
                self._drop(f"backlog over {INBOX_MAX_BYTES} bytes: dropped {clip(message.topic, 200)} (asked again)")
                return
            self._inbox_bytes += size
        self._inbox.put((message.topic, bytes(message.payload)))

    def _drop(self, what: str) -> None:
        """Count a dropped message; log at most one WARNING every DROP_LOG_INTERVAL_S (caller holds the lock)."""
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            log.warning("bundle receiver: %s (%d dropped since start)", what, self.dropped)

    # -- the worker thread ---------------------------------------------------------------------------------------

    def _work(self) -> None:
        next_sweep_s = time.monotonic()
        while True:
            try:
                item = self._inbox.get(timeout=self._sweep_interval_s)
            except queue.Empty:
                item = ("", b"")
            if item is None:
                return
            try:
                if item[0]:
                    self._dispatch(*item)
                if time.monotonic() >= next_sweep_s:
                    next_sweep_s = time.monotonic() + self._sweep_interval_s
                    self._sweep()
            except Exception:  # top of the receiver's thread: one bad push must not stop the later ones
                log.exception("bundle receiver failed on %s; carrying on", item[0] or "its sweep")

    def _dispatch(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self._inbox_bytes -= len(payload)
        match = self._topics.match(topic)
        if match is None or match.levels.get("agent") != self._agent_id:
            log.warning("ignoring a message on %s: not a push topic of this agent", clip(topic, 200))
            return
        topics = self._topics.push(self._agent_id, match.levels["transfer"])
        if match.channel.name == "push_meta":
            self._on_meta(topics, payload)
        elif match.channel.name == "push_chunk":
            self._on_chunk(topics, match.levels["index"], payload)

    def _on_meta(self, topics: PushTopics, payload: bytes) -> None:
        try:
            meta = decode(TransferMeta, payload)
            if meta.transfer_id != topics.transfer:
                msg = f"transfer_id {meta.transfer_id!r} differs from the topic's {topics.transfer!r}"
                raise ContractError(msg)
        except ContractError as error:
            self._publish_verdict(topics, None, "failed", f"meta is not valid: {error}")
            return
        current = self._transfers.get(meta.transfer_id)
        if current is not None and current.meta.same_archive(meta):
            if current.state == "receiving":  # a sender asking what is missing, maybe a new one: resume
                log.info(
                    "transfer %s: asked again; holding %d of %d chunks",
                    meta.transfer_id,
                    len(current.received),
                    meta.chunk_count,
                )
                current.replace_meta(meta)
                self._answer_meta(current)
                return
            if current.meta.push_id == meta.push_id:  # the same push asking again: repeat the verdict
                shadow = self._shadows.get(meta.transfer_id)
                self._publish_verdict(topics, current, current.state, current.reason, shadow=shadow)
                return
        if problem := self._refusal(meta):  # before anything on disk changes: unsigned traffic touches nothing
            self._publish_verdict(topics, None, "failed", problem, model=meta.model)
            return
        if current is not None:
            log.info("transfer %s: a new push replaces the staged one (%s)", meta.transfer_id, current.state)
            self._discard(current)
        incoming = _Incoming.create(self._staging_dir / meta.transfer_id, meta)
        self._transfers[meta.transfer_id] = incoming
        log.info(
            "transfer %s of %s started: %d bytes in %d chunks",
            meta.transfer_id,
            meta.model,
            meta.total_bytes,
            meta.chunk_count,
        )
        self._answer_meta(incoming)

    def _answer_meta(self, incoming: _Incoming) -> None:
        if incoming.complete:  # staged before a restart: install it now
            self._finish(incoming)
        else:
            self._ack(incoming, "receiving", missing=as_ranges(incoming.missing()))

    def _on_chunk(self, topics: PushTopics, index_text: str, payload: bytes) -> None:
        incoming = self._transfers.get(topics.transfer)
        if incoming is None or incoming.state != "receiving":  # late duplicates, or meta not seen yet
            log.debug("ignoring chunk %s of transfer %s (%s)", index_text, topics.transfer, incoming and incoming.state)
            return
        index, problem = incoming.check(index_text, payload)
        if index is None or problem:
            log.warning("transfer %s: refused %s", topics.transfer, problem)
            self._ack(incoming, "receiving", chunk=index, refused=problem)
            return
        if index not in incoming.received:
            try:
                incoming.store(index, payload)
            except OSError as error:
                self._conclude(incoming, "failed", f"cannot write chunk {index} to {incoming.archive}: {error}")
                return
        self._ack(incoming, "receiving", chunk=index)
        if incoming.complete:
            self._finish(incoming)

    def _finish(self, incoming: _Incoming) -> None:
        """Verify the whole archive, unpack it, let on_bundle judge it, publish the verdict."""
        self._ack(incoming, "verifying")
        try:
            actual = file_sha256(incoming.archive)
            if actual != incoming.meta.sha256:
                msg = f"archive sha256 {actual[:12]}… differs from the meta's {incoming.meta.sha256[:12]}…: push again"
                raise ArchiveError(msg)
            _remove(incoming.bundle)
            unpack_bundle(
                incoming.archive,
                incoming.bundle,
                max_bytes=incoming.meta.total_bytes,
                max_members=self._limits.max_members,
            )
        except (ArchiveError, OSError) as error:
            self._conclude(incoming, "failed", f"bundle archive refused: {error}")
            return
        try:
            outcome = BundleOutcome(*self._on_bundle(incoming.bundle, incoming.meta))
        except Exception as error:  # the agent's code: its failure is this push's verdict, not the receiver's end
            log.exception("on_bundle failed on transfer %s", incoming.meta.transfer_id)
            outcome = BundleOutcome(False, f"on_bundle failed: {type(error).__name__}: {error}")
        state: TransferState = "received" if outcome.ok else "failed"
        self._conclude(incoming, state, str(outcome.reason), shadow=outcome.shadow)

    def _conclude(
        self, incoming: _Incoming, state: TransferState, reason: str, *, shadow: ShadowResult | None = None
    ) -> None:
        incoming.state, incoming.reason, incoming.updated_unix_s = state, reason, time.time()
        _remove(incoming.archive)
        _remove(incoming.bundle)
        incoming.save()  # only transfer.json stays, until the sweep: a sender asking again gets the verdict
        if shadow is not None:
            self._shadows[incoming.meta.transfer_id] = shadow
        topics = self._topics.push(self._agent_id, incoming.meta.transfer_id)
        self._publish_verdict(topics, incoming, state, reason, shadow=shadow)

    def _sweep(self) -> None:
        """Install transfers staged whole before a restart; fail and remove those idle for transfer_timeout_s."""
        now = time.time()
        for incoming in list(self._transfers.values()):
            if incoming.state == "receiving" and incoming.complete and self._subscribed.is_set():
                self._finish(incoming)
                continue
            idle_s = now - incoming.updated_unix_s
            if idle_s < self._abandon_after_s:
                continue
            if incoming.state == "receiving":
                reason = f"abandoned: nothing arrived for {idle_s:.0f} s (rollout.transfer_timeout_s={self._abandon_after_s:g}); push again"
                self._conclude(incoming, "failed", reason)
            self._discard(incoming)

    def _discard(self, incoming: _Incoming) -> None:
        _remove(incoming.folder)
        self._transfers.pop(incoming.meta.transfer_id, None)
        self._shadows.pop(incoming.meta.transfer_id, None)

    def _refusal(self, meta: TransferMeta) -> str:
        """Why a new transfer is refused: the operator's authority first, then the staging limits."""
        if refusal := self._admit(meta):
            return refusal
        staged = [each for each in self._transfers.values() if each.state == "receiving"]
        return self._limits.refusal(meta, staged=staged, free_bytes=shutil.disk_usage(self._staging_dir).free)

    def _ack(
        self,
        incoming: _Incoming,
        state: TransferState,
        *,
        missing: tuple[tuple[int, int], ...] | None = None,
        chunk: int | None = None,
        refused: str = "",
    ) -> None:
        ack = TransferAck(
            transfer_id=incoming.meta.transfer_id,
            state=state,
            received=len(incoming.received),
            chunk_count=incoming.meta.chunk_count,
            missing=missing,
            chunk=chunk,
            refused=clip(refused, 500),
        )
        topics = self._topics.push(self._agent_id, incoming.meta.transfer_id)
        self._client.publish(topics.ack, ack.encode(), qos=1)

    def _publish_verdict(
        self,
        topics: PushTopics,
        incoming: _Incoming | None,
        state: TransferState,
        reason: str,
        *,
        model: str = "",
        shadow: ShadowResult | None = None,
    ) -> None:
        """The final answer on the ack topic and, as a ModelEvent, on the agent's model events topic."""
        received, count = (len(incoming.received), incoming.meta.chunk_count) if incoming else (0, 0)
        model = incoming.meta.model if incoming else model
        reason = clip(reason, 500)
        ack = TransferAck(transfer_id=topics.transfer, state=state, received=received, chunk_count=count, reason=reason)
        self._client.publish(topics.ack, ack.encode(), qos=1)
        event = ModelEvent(
            agent_id=self._agent_id,
            action="push",
            request_id=topics.transfer,
            outcome="accepted" if state == "received" else "refused",
            model=model,
            serving=model if state == "received" else "",
            reason=reason,
            shadow=shadow,
            ts=time.time(),
        )
        self._client.publish(self._topics.model_events(self._agent_id), event.encode(), qos=1)
        level = logging.INFO if state == "received" else logging.ERROR
        log.log(level, "transfer %s of %s %s: %s", topics.transfer, model or "?", state, reason)
