"""Labels for stored samples: signed SampleLabels from MQTT become label.json beside the sample.

Hosted by the rollout process (agent/rollout/worker.py): it is already the agent's one listener for operator
input on the broker, off the frame path (a flood of labels cannot delay a verdict), and the supervisor restarts
it like any worker. A label is stored only when it is signed by a key in samples.label_keys or
rollout.operator_keys, names this agent, was issued within rollout.command_max_age_s of the agent's clock and
carries a nonce not seen before (kept in <samples>/label-nonces.json, apart from the model commands' nonces).
Every label gets a SampleLabelResult (stored, or refused with the reason) on `<prefix>/<agent>/samples/events`.
Input is bounded: the contract caps a label at 4 KiB, at most LABEL_QUEUE wait, refusals are answered and
logged up to REFUSALS_PER_MINUTE, and every dropped one is counted and logged at most once every
DROP_LOG_INTERVAL_S.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

from ..authority import CommandRefused, CommandVerifier
from ..config import AgentConfig
from ..contract import ContractError, LabelKind, ModelCommand, SampleLabel, SampleLabelResult, Topics, clip, decode
from ..mqtt import MqttPublisher, Subscription
from ..signing import load_trusted_keys
from .files import NONCE_FILE, SampleFileError, StoredLabel, find_sample, write_label
from .ratelimit import RateLimit
from .store import samples_root

log = logging.getLogger(__name__)

LABEL_QUEUE = 64
DROP_LOG_INTERVAL_S = 10.0
REFUSALS_PER_MINUTE = 600  # answered and logged; past this, refusals are only counted (a flood of forged labels)


class LabelError(Exception):
    """A label cannot be stored: unknown or evicted sample, a defect type without nok; the message says why."""


def new_label(agent_id: str, sample_id: str, label: LabelKind, *, by: str, defect_type: str = "") -> SampleLabel:
    """An unsigned label issued now with fresh ids; sign it with authority.sign_command before sending."""
    request_id, nonce = ModelCommand.new_ids()
    return SampleLabel(
        agent_id=agent_id,
        sample_id=sample_id,
        label=label,
        defect_type=defect_type,
        by=by,
        request_id=request_id,
        issued_ts=time.time(),
        nonce=nonce,
    )


def store_label(
    root: Path,
    sample_id: str,
    label: LabelKind,
    *,
    defect_type: str = "",
    by: str,
    via: str = "local",
    key_id: str = "",
    request_id: str = "",
) -> Path:
    """Write label.json for `sample_id` under root; returns the sample folder. LabelError with the reason."""
    if defect_type and label != "nok":
        msg = f"a defect type ({defect_type!r}) belongs to a nok label, not {label}: drop it or label nok"
        raise LabelError(msg)
    folder = find_sample(root, sample_id)
    if folder is None:
        msg = f"sample {sample_id} is not stored on this agent (never kept, or evicted since); `lineguard-agent samples list` shows what is"
        raise LabelError(msg)
    record = StoredLabel(
        label=label,
        defect_type=defect_type,
        by=by,
        labelled_ts=time.time(),
        via=via,  # type: ignore[arg-type]
        key_id=key_id,
        request_id=request_id,
    )
    try:
        write_label(folder, record)
    except SampleFileError as error:
        raise LabelError(str(error)) from error
    return folder


class LabelListener:
    """Signed labels for one agent's samples, from the broker, one at a time on one thread."""

    def __init__(self, config: AgentConfig, publisher: MqttPublisher) -> None:
        self.config, self.publisher = config, publisher
        self.root = samples_root(config)
        self.topics = Topics(config.mqtt.topic_prefix)
        keys = load_trusted_keys((*config.samples.label_keys, *config.rollout.operator_keys))
        self.verifier = CommandVerifier(
            config.agent_id, keys, self.root / NONCE_FILE, max_age_s=config.rollout.command_max_age_s
        )
        self.dropped = self.stored = self.refused = 0
        self._refusal_budget = RateLimit(REFUSALS_PER_MINUTE)
        self._last_drop_log = -DROP_LOG_INTERVAL_S
        self._labels: queue.Queue[SampleLabel | None] = queue.Queue(maxsize=LABEL_QUEUE)
        self._runner = threading.Thread(target=self._run, name="sample-labels", daemon=True)
        self._runner.start()
        base_id = config.mqtt.client_id or f"lineguard-{config.agent_id}"
        self._listener = Subscription(
            config.mqtt, f"{base_id}-labels", [self.topics.sample_label(config.agent_id)], self._on_message
        )
        log.info("listening for sample labels (%d trusted keys)", len(keys))

    def _on_message(self, topic: str, payload: bytes, properties: object) -> None:
        """paho's thread: decode and queue; never blocks, never raises."""
        try:
            label = decode(SampleLabel, payload)
        except ContractError as error:
            self._drop(f"refused a sample label on {topic}: {error}")
            return
        try:
            self._labels.put_nowait(label)
        except queue.Full:
            self._drop(f"refused sample label {label.request_id}: {LABEL_QUEUE} labels already waiting")

    def _drop(self, what: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            log.warning("%s (%d dropped since start)", clip(what, 400), self.dropped)

    def _run(self) -> None:
        while (label := self._labels.get()) is not None:
            try:
                self._apply(label)
            except Exception:  # top of the label thread: one bad label must not end the listener
                log.exception("sample label %s failed", label.request_id)

    def _apply(self, label: SampleLabel) -> None:
        try:
            key_id = self.verifier.check(label)
            store_label(
                self.root,
                label.sample_id,
                label.label,
                defect_type=label.defect_type,
                by=label.by,
                via="mqtt",
                key_id=key_id,
                request_id=label.request_id,
            )
        except (CommandRefused, LabelError) as error:
            self.refused += 1
            if self._refusal_budget.allow():
                self._answer(label, "refused", str(error))
            else:
                self._drop(f"refused sample label {label.request_id} unanswered, over {REFUSALS_PER_MINUTE} a minute")
            return
        self.stored += 1
        kind = f"nok ({label.defect_type})" if label.defect_type else label.label
        self._answer(label, "stored", f"{label.sample_id} labelled {kind} by {label.by}")

    def _answer(self, label: SampleLabel, outcome: str, reason: str) -> None:
        result = SampleLabelResult(
            agent_id=self.config.agent_id,
            sample_id=label.sample_id,
            request_id=label.request_id,
            outcome=outcome,  # type: ignore[arg-type]
            reason=clip(reason, 500),
            ts=time.time(),
        )
        self.publisher.publish(self.topics.sample_events(self.config.agent_id), result, qos=1)
        level = logging.INFO if outcome == "stored" else logging.WARNING
        log.log(level, "sample label %s %s: %s", label.request_id, outcome, clip(reason, 300))

    def close(self) -> None:
        self._listener.close()
        self._labels.put(None)
        self._runner.join(timeout=10)
