"""The agent's `rollout` process: bundles pushed by operators and their commands become model swaps here.

A pushed bundle arrives in chunks (receiver.py), then goes through the same path as
`lineguard-agent activate` (swap.py): signature and digests, install into the store, load beside
the serving model, canary, swap. Commands (ModelCommand on `<prefix>/<agent_id>/model/command`)
are decoded through the contract and run one at a time on one thread, from a bounded queue.
Pushes and commands must carry an operator's signature (agent/authority.py, keys in
rollout.operator_keys): a push's meta names the archive's sha256 and this agent, so nothing unsigned
is staged, and a recorded command cannot be replayed. Every outcome goes to the operator (the
transfer's ack) and to everyone as a ModelEvent.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path

import zmq

from ..authority import CommandRefused, CommandVerifier
from ..bundle import BundleError
from ..config import AgentConfig
from ..contract import ContractError, ModelCommand, ModelEvent, Topics, TransferMeta, clip, decode
from ..ipc import Sender, endpoint
from ..messages import Heartbeat
from ..mqtt import MqttPublisher, Subscription
from ..samples.labels import LabelListener
from ..signing import KeyFileError, SignatureError, load_trusted_keys
from .receiver import BundleOutcome, BundleReceiver
from .staging import StagingLimits
from .store import ModelStoreError
from .swap import activate, rollback

log = logging.getLogger(__name__)

_REFUSALS = (BundleError, SignatureError, KeyFileError, ModelStoreError)
COMMAND_QUEUE = 16  # commands waiting to run; more are refused (logged, counted), never a thread each
DROP_LOG_INTERVAL_S = 10.0


class RolloutWorker:
    """Bundle pushes and model commands for one agent."""

    def __init__(self, config: AgentConfig, context: zmq.Context) -> None:
        self.config = config
        self.topics = Topics(config.mqtt.topic_prefix)
        base_id = config.mqtt.client_id or f"lineguard-{config.agent_id}"
        self.publisher = MqttPublisher(
            config.mqtt,
            client_id=f"{base_id}-rollout",
            status_topic=self.topics.model_events(config.agent_id),
            will=None,
        )
        self.verifier = CommandVerifier(
            config.agent_id,
            load_trusted_keys(config.rollout.operator_keys),
            config.state_dir / "rollout" / "nonces.json",
            max_age_s=config.rollout.command_max_age_s,
        )
        self._verify_lock = threading.Lock()  # the receiver's and the command thread's checks share the nonces
        rollout = config.rollout
        self.receiver = BundleReceiver(
            config.mqtt,
            agent_id=config.agent_id,
            staging_dir=rollout.staging_dir or config.state_dir / "staging",
            on_bundle=self._on_bundle,
            admit=self._admit,
            limits=StagingLimits(
                max_transfers=rollout.max_transfers,
                staging_max_bytes=rollout.staging_max_bytes,
                reserve_bytes=rollout.staging_reserve_bytes,
                max_archive_bytes=rollout.max_archive_bytes,
                max_chunks=rollout.max_chunks,
                max_members=rollout.max_archive_members,
                timeout_s=rollout.transfer_timeout_s,
            ),
        )
        self.to_supervisor = Sender(context, endpoint(config.run_dir, "supervisor"))
        self.dropped = 0
        self._last_drop_log = -DROP_LOG_INTERVAL_S
        self._commands: queue.Queue[ModelCommand | None] = queue.Queue(maxsize=COMMAND_QUEUE)
        self._runner = threading.Thread(target=self._run_commands, name="model-commands", daemon=True)
        self._runner.start()
        self._listener = Subscription(
            config.mqtt, f"{base_id}-commands", [self.topics.model_command(config.agent_id)], self._on_message
        )
        # Sample labels are operator input too: heard here, off the frame path (agent/samples/labels.py).
        self.labels = LabelListener(config, self.publisher) if config.samples.enabled else None

    def _admit(self, meta: TransferMeta) -> str:
        """The receiver's thread: why a new transfer is refused before anything is staged ("" = admitted)."""
        command = meta.command
        if command is None:
            return "the push carries no signed command; push with lineguard-deploy --operator-key (an operator key)"
        if command.action != "push" or command.model != meta.model or command.sha256 != meta.sha256:
            return f"the signed command is for {command.action} of {command.model or 'no model'}, not this archive"
        try:
            with self._verify_lock:
                self.verifier.check(command)
        except CommandRefused as error:
            return str(error)
        return ""

    def _on_bundle(self, path: Path, meta: TransferMeta) -> BundleOutcome:
        allow_downgrade = meta.command is not None and meta.command.allow_downgrade
        try:
            activation = activate(self.config, path, allow_downgrade=allow_downgrade)
        except _REFUSALS as error:
            log.warning("push %s refused: %s", meta.transfer_id, error)
            return BundleOutcome(False, str(error))
        return BundleOutcome(True, activation.summary, activation.shadow)

    def _on_message(self, topic: str, payload: bytes, properties: object) -> None:
        """paho's thread: decode and queue; never blocks, never raises."""
        try:
            command = decode(ModelCommand, payload)
        except ContractError as error:
            self._drop(f"refused a model command on {topic}: {error}")
            return
        try:
            self._commands.put_nowait(command)
        except queue.Full:
            self._drop(f"refused model command {command.request_id}: {COMMAND_QUEUE} commands already waiting")

    def _drop(self, what: str) -> None:
        """Count a refused input; log it at most once every DROP_LOG_INTERVAL_S."""
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            log.warning("%s (%d refused since start)", clip(what, 400), self.dropped)

    def _run_commands(self) -> None:
        while (command := self._commands.get()) is not None:
            try:
                self._execute(command)
            except Exception:  # top of the command thread: one failed command must not end the listener
                log.exception("model command %s failed", command.request_id)

    def _execute(self, command: ModelCommand) -> None:
        try:
            with self._verify_lock:
                self.verifier.check(command)
        except CommandRefused as error:
            self._event(command, "refused", str(error))
            return
        if command.action != "rollback":
            self._event(command, "refused", f"action {command.action} is not a command here; pushes carry it in meta")
            return
        try:
            label = rollback(self.config, to=command.model)
        except _REFUSALS as error:
            self._event(command, "refused", str(error))
            return
        self._event(command, "accepted", f"{label} is serving", serving=label)

    def _event(self, command: ModelCommand, outcome: str, reason: str, *, serving: str = "") -> None:
        event = ModelEvent(
            agent_id=self.config.agent_id,
            action=command.action,
            request_id=command.request_id,
            outcome=outcome,  # type: ignore[arg-type]
            model=command.model,
            serving=serving,
            reason=clip(reason, 500),
            ts=time.time(),
        )
        self.publisher.publish(self.topics.model_events(self.config.agent_id), event, qos=1)

    def heartbeat(self) -> None:
        self.to_supervisor.send(Heartbeat(process="rollout", pid=os.getpid(), t_ns=time.monotonic_ns()))

    def close(self) -> None:
        if self.labels is not None:
            self.labels.close()
        self._listener.close()
        self._commands.put(None)
        self._runner.join(timeout=30)
        self.receiver.close(timeout_s=5.0)
        self.publisher.close()
        self.to_supervisor.close()


def run(config: AgentConfig, stop: threading.Event) -> int:
    """The rollout process body."""
    context = zmq.Context()
    worker = RolloutWorker(config, context)
    try:
        while not stop.wait(1.0):
            worker.heartbeat()
    finally:
        worker.close()
        context.term()
    return 0
