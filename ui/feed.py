"""The broker subscription: every message of the followed line(s) is decoded through the contract, then goes to
the in-memory state, the SQLite store (queued), the alarm book and the live pages (hub).

One paho client with a persistent session (verdicts published while the dashboard restarts still arrive),
connected in the background: a broker that is down at start-up or goes away later shows as a banner on the
page, never as an error. Nothing here waits for the disk or a browser. Payloads that do not meet the
contract are dropped, counted and logged (rate-limited), never echoed at length.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import paho.mqtt.client as mqtt

from lineguard.agent.contract import (
    ANY,
    ActuatorStatus,
    AgentStatus,
    ContractError,
    HeatmapInfo,
    ModelEvent,
    SampleLabelResult,
    SampleRecord,
    TopicMatch,
    Topics,
    Verdict,
    decode,
)
from lineguard.agent.mqtt import make_client, start, stop

from . import alarms as rules
from .alarms import Alarm, AlarmBook, Condition
from .config import UiConfig
from .drops import Drops
from .hub import Event, Hub
from .labels import Labeller, LabelRefused
from .state import LineState
from .store import GalleryEntry, Store
from .views import agent_card, camera_stats, frame_ref, plain

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 4 * 2**20  # a heatmap larger than this is dropped (the agent renders a few hundred KB at most)
UNPAIRED_HEATMAPS = 64  # heatmaps held until their verdict arrives
TICK_S = 1.0
STATS_EVERY_S = 2.0


@dataclass(frozen=True, slots=True)
class BrokerState:
    """The dashboard's link to the broker: the page shows a banner while `connected` is false."""

    connected: bool
    since_ts: float
    detail: str


class Feed:
    """Subscribes on start(); handlers run on paho's thread, the alarm and chart ticker on its own."""

    def __init__(
        self, config: UiConfig, state: LineState, store: Store, book: AlarmBook, hub: Hub, drops: Drops
    ) -> None:
        self.config = config
        self.topics = Topics(config.mqtt.topic_prefix)
        self.state, self.store, self.book, self.hub, self.drops = state, store, book, hub, drops
        self.broker = BrokerState(False, time.time(), f"connecting to {config.mqtt.host}:{config.mqtt.port}")
        self.labeller: Labeller | None = None
        self._unpaired: OrderedDict[tuple[str, str, int], tuple[HeatmapInfo, bytes, str]] = OrderedDict()
        self._handlers: dict[str, Callable[[TopicMatch, bytes, Any], None]] = {
            "verdict": self._on_verdict,
            "heatmap": self._on_heatmap,
            "sample": self._on_sample,
            "status": self._on_status,
            "model_events": self._on_model_event,
            "sample_events": self._on_label_result,
            "actuator_status": self._on_actuator,
        }
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="alarm-ticker", daemon=True)
        self.client = make_client(config.mqtt, config.client_id)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def filters(self) -> list[str]:
        line = self.config.line
        return [
            self.topics.verdict(line, ANY, ANY),
            self.topics.heatmap(line, ANY, ANY),
            self.topics.sample(line, ANY, ANY),
            self.topics.status(ANY),
            self.topics.model_events(ANY),
            self.topics.sample_events(ANY),
            self.topics.actuator_status(ANY),
        ]

    def start(self) -> None:
        start(self.client, self.config.mqtt, persistent=True)
        self._ticker.start()
        log.info("following line %s on %s:%d", self.config.line, self.config.mqtt.host, self.config.mqtt.port)

    def close(self) -> None:
        self._stop.set()
        stop(self.client)
        if self._ticker.is_alive():
            self._ticker.join(timeout=5)

    # -- connection -----------------------------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            hint = "; check mqtt.username and mqtt.password" if reason.value in (0x86, 0x87) else ""
            self._set_broker(False, f"the broker refused the connection: {reason}{hint}")
            return
        client.subscribe([(each, 1) for each in self.filters()])
        self._set_broker(True, f"connected to {self.config.mqtt.host}:{self.config.mqtt.port}")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not self._stop.is_set():
            self._set_broker(
                False, f"lost the broker {self.config.mqtt.host}:{self.config.mqtt.port} ({reason}); reconnecting"
            )

    def _set_broker(self, connected: bool, detail: str) -> None:
        if connected != self.broker.connected:
            (log.info if connected else log.warning)("broker: %s", detail)
        self.broker = BrokerState(connected, time.time(), detail)
        self.hub.publish(Event("broker", "", plain(self.broker)))

    def send_label(self, agent_id: str, payload: bytes) -> None:
        """Publish a signed label to the agent (QoS 1); LabelRefused while the broker is away."""
        if not self.broker.connected:
            msg = f"the broker is not reachable ({self.broker.detail}); try again when the banner is gone"
            raise LabelRefused(msg)
        info = self.client.publish(self.topics.sample_label(agent_id), payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            msg = f"publishing the label failed: {mqtt.error_string(info.rc)}"
            raise LabelRefused(msg)

    # -- messages (paho's thread) ---------------------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        match = self.topics.match(message.topic)
        handler = None if match is None else self._handlers.get(match.channel.name)
        if match is None or handler is None:
            self.drops.drop("unexpected-topic", message.topic)
            return
        try:
            handler(match, bytes(message.payload), message.properties)
        except ContractError as error:
            self.drops.drop(f"malformed-{match.channel.name}", f"{message.topic[:120]}: {error}")
        except Exception:  # top of paho's callback: one bad message must not stop the feed
            log.exception("handling a message on %s failed; dropped", message.topic[:200])

    def _on_verdict(self, match: TopicMatch, payload: bytes, properties: Any) -> None:
        verdict = decode(Verdict, payload)
        _check_levels(match, verdict.line, verdict.agent_id, verdict.camera)
        now = time.time()
        if not self.state.add_verdict(verdict, now):
            return  # redelivered (QoS 1 after a reconnect): already counted, stored and shown
        self.store.add_verdict(verdict)
        self.hub.publish(Event("verdict", verdict.line, verdict.model_dump(mode="json")))
        if verdict.verdict == "reject":
            paired = self._unpaired.pop(verdict.key, None)
            self._gallery(
                _entry_of(verdict, now),
                heatmap=None if paired is None else paired[1],
                image_format=paired[0].format if paired else "",
            )

    def _on_heatmap(self, match: TopicMatch, payload: bytes, properties: Any) -> None:
        info = HeatmapInfo.from_user_properties(getattr(properties, "UserProperty", None))
        line = match.levels["line"]
        _check_levels(match, line, info.agent_id, info.camera)
        if len(payload) > MAX_IMAGE_BYTES:
            msg = f"heatmap of {len(payload)} bytes is over the {MAX_IMAGE_BYTES} byte limit"
            raise ContractError(msg)
        now = time.time()
        frame = self.state.add_frame(info, line, payload, now)
        reference = frame_ref_of(self.state, info.agent_id, info.camera)
        self.hub.publish(Event("frame", line, plain(reference)))
        if frame.verdict is None:
            self._unpaired[(info.agent_id, info.camera, info.seq)] = (info, payload, line)
            while len(self._unpaired) > UNPAIRED_HEATMAPS:
                self._unpaired.popitem(last=False)
        elif frame.verdict.verdict == "reject":
            self._gallery(_entry_of(frame.verdict, now), heatmap=payload, image_format=info.format)

    def _on_sample(self, match: TopicMatch, payload: bytes, properties: Any) -> None:
        record = decode(SampleRecord, payload)
        _check_levels(match, record.line, record.agent_id, record.camera)
        try:
            thumbnail = base64.b64decode(record.thumbnail_jpeg, validate=True) if record.thumbnail_jpeg else None
        except (binascii.Error, ValueError) as error:
            msg = f"SampleRecord {record.sample_id}: thumbnail_jpeg is not base64"
            raise ContractError(msg) from error
        known = self.state.verdict_of(record.agent_id, record.camera, record.seq)
        entry = GalleryEntry(
            agent_id=record.agent_id,
            line=record.line,
            camera=record.camera,
            seq=record.seq,
            kind=record.kind,
            verdict=record.verdict,
            score=record.score,
            threshold=record.threshold,
            model=record.model,
            reason="" if known is None else known.reason,
            capture_ts=record.capture_ts,
            received_ts=time.time(),
            sample_id=record.sample_id,
        )
        self.store.put_gallery(entry, thumbnail=thumbnail)
        if thumbnail is not None and self.state.image(_key(entry)) is None:
            self.state.keep_image(_key(entry), "image/jpeg", thumbnail)
        self.hub.publish(Event("gallery", record.line, plain(entry)))

    def _gallery(self, entry: GalleryEntry, *, heatmap: bytes | None, image_format: str) -> None:
        if heatmap is not None:
            entry = replace(entry, image_format=image_format)
            self.state.keep_image(_key(entry), f"image/{image_format}", heatmap)
        self.store.put_gallery(entry, heatmap=heatmap)
        self.hub.publish(Event("gallery", entry.line, plain(entry)))

    def _on_status(self, match: TopicMatch, payload: bytes, properties: Any) -> None:
        status = decode(AgentStatus, payload)
        if match.levels["agent"] != status.agent_id:
            msg = f"status of {status.agent_id} arrived on the topic of {match.levels['agent']}"
            raise ContractError(msg)
        if self.config.line not in (ANY, status.line):
            return  # another line's agent: this dashboard does not follow it
        self.state.set_status(status)
        self._publish_agents(status.line)

    def _publish_agents(self, line: str) -> None:
        thresholds = self.state.thresholds()
        with self.state.lock:
            cards = [agent_card(agent, thresholds) for agent in self.state.agents.values() if agent.line == line]
        self.hub.publish(Event("agents", line, plain(cards)))

    def _on_model_event(self, match: TopicMatch, payload: bytes, properties: Any) -> None:
        event = decode(ModelEvent, payload)
        line = self.state.add_model_event(event)
        if line and self.config.line not in (ANY, line):
            return  # an agent of another line; one not seen yet ("") is kept: its status may come later
        self.store.add_push(event)
        self.hub.publish(Event("push", line, event.model_dump(mode="json")))
        self._event_alarm(rules.swap_refused(event, line))
        if line:
            self._publish_agents(line)

    def _on_label_result(self, match: TopicMatch, payload: bytes, properties: Any) -> None:
        answer = decode(SampleLabelResult, payload)
        row = None if self.labeller is None else self.labeller.result(answer)
        if row is not None:
            self.hub.publish(Event("label", self.state.line_of(answer.agent_id), plain(row)))

    def _on_actuator(self, match: TopicMatch, payload: bytes, properties: Any) -> None:
        status = decode(ActuatorStatus, payload)
        if self.config.line not in (ANY, status.line):
            return
        previous = self.state.set_actuator(status)
        self.hub.publish(Event("actuator", status.line, status.model_dump(mode="json")))
        self._event_alarm(rules.handshake_failures(previous, status))

    def _event_alarm(self, condition: Condition | None) -> None:
        if condition is not None:
            alarm = self.book.event(condition, time.time())
            if alarm is not None:
                self.publish_alarm(alarm)

    def publish_alarm(self, alarm: Alarm) -> None:
        self.hub.publish(Event("alarm", alarm.line, plain(alarm)))

    # -- the ticker (its own thread) ------------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        next_stats = 0.0
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + STATS_EVERY_S
                    self._publish_stats()
            except Exception:  # top of the ticker: keep evaluating alarms whatever one round hit
                log.exception("alarm and chart tick failed; next one in %.0f s", TICK_S)

    def tick(self) -> list[Alarm]:
        """Evaluate the alarm rules once; the alarms that changed."""
        facts, subjects = self.state.facts(self.config.alarms)
        changed = self.book.sync(rules.evaluate(facts, self.config.alarms), subjects, time.time())
        for alarm in changed:
            self.publish_alarm(alarm)
        return changed

    def _publish_stats(self) -> None:
        now = time.time()
        with self.state.lock:
            stats = [camera_stats(view, now) for view in self.state.cameras.values()]
        for each in stats:
            self.hub.publish(Event("stats", each.line, plain(each)))


def frame_ref_of(state: LineState, agent_id: str, camera: str) -> Any:
    with state.lock:
        view = state.cameras.get((agent_id, camera))
        return None if view is None else frame_ref(view)


def _key(entry: GalleryEntry) -> tuple[str, str, int]:
    return entry.agent_id, entry.camera, entry.seq


def _entry_of(verdict: Verdict, now: float) -> GalleryEntry:
    return GalleryEntry(
        agent_id=verdict.agent_id,
        line=verdict.line,
        camera=verdict.camera,
        seq=verdict.seq,
        kind=verdict.verdict,
        verdict=verdict.verdict,
        score=verdict.score,
        threshold=verdict.threshold,
        model=verdict.model,
        reason=verdict.reason,
        capture_ts=verdict.capture_ts,
        received_ts=now,
    )


def _check_levels(match: TopicMatch, line: str, agent_id: str, camera: str) -> None:
    """A record must name the line, agent and camera of the topic it came on (else an ACL gap lets one agent
    speak for another)."""
    levels = match.levels
    said = (levels["line"], levels["agent"], levels["camera"])
    if said != (line, agent_id, camera):
        msg = f"record for {line}/{agent_id}/{camera} arrived on the topic of {'/'.join(map(str, said))}"
        raise ContractError(msg)
