"""The agent's `models` process: receives pushed bundles and rollback commands from operators over MQTT.

A pushed bundle arrives in chunks (lineguard.agent.transfer), then goes through the same path
as `lineguard-agent activate`: signature and digests, install into the store, load beside the
serving model, canary, swap. The answer (received/failed and why) goes back to the operator on
the transfer's ack topic and to everyone on `<prefix>/<agent_id>/model/events`.
Commands: `<prefix>/<agent_id>/model/command` JSON {"action": "rollback", "request_id": ...}.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import zmq

from .bundle import BundleError
from .config import AgentConfig
from .ipc import Sender, endpoint
from .manager import activate, rollback
from .messages import Heartbeat
from .mqtt import MqttPublisher, topics
from .signing import KeyFileError, SignatureError

log = logging.getLogger(__name__)

_REFUSALS = (BundleError, SignatureError, KeyFileError)


def command_topic(config: AgentConfig) -> str:
    return f"{config.mqtt.topic_prefix}/{config.agent_id}/model/command"


class Deployments:
    """Bundle pushes and rollback commands for one agent."""

    def __init__(self, config: AgentConfig, context: zmq.Context) -> None:
        from .transfer import BundleReceiver

        self.config = config
        self.events_topic = topics(config.mqtt.topic_prefix, config.line, config.agent_id).model_events
        client_id = f"{config.mqtt.client_id or f'lineguard-{config.agent_id}'}-models"
        self.publisher = MqttPublisher(config.mqtt, client_id=client_id, status_topic=f"{self.events_topic}/online")
        self.receiver = BundleReceiver(
            config.mqtt, agent_id=config.agent_id, staging_dir=config.state_dir / "staging", on_bundle=self._on_bundle
        )
        self.to_supervisor = Sender(context, endpoint(config.run_dir, "supervisor"))
        self._commands = _CommandListener(config, self._on_command)

    def _on_bundle(self, path: Path, transfer_id: str) -> tuple[bool, str]:
        try:
            outcome = activate(self.config, path)
        except _REFUSALS as error:
            log.warning("push %s refused: %s", transfer_id, error)
            return False, str(error)
        return True, outcome

    def _on_command(self, command: dict[str, object]) -> None:
        request_id = str(command.get("request_id", ""))
        if command.get("action") != "rollback":
            self._event(request_id, "failed", f"unknown action {command.get('action')!r}; known: rollback")
            return
        try:
            label = rollback(self.config)
        except _REFUSALS as error:
            self._event(request_id, "failed", str(error))
            return
        self._event(request_id, "rolled-back", f"{label} is serving")

    def _event(self, request_id: str, state: str, reason: str) -> None:
        event = {"request_id": request_id, "state": state, "reason": reason, "ts": time.time()}
        self.publisher.publish_json(self.events_topic, event, qos=1)

    def heartbeat(self) -> None:
        self.to_supervisor.send(Heartbeat(process="models", pid=os.getpid(), t_ns=time.monotonic_ns()))

    def close(self) -> None:
        self._commands.close()
        self.receiver.close(timeout_s=5.0)
        self.publisher.close()
        self.to_supervisor.close()


class _CommandListener:
    """Subscribes to the agent's command topic; runs each command on its own thread, one at a time."""

    def __init__(self, config: AgentConfig, handle: object) -> None:
        from .transfer import make_client

        self._handle = handle
        self._lock = threading.Lock()
        self._topic = command_topic(config)
        client_id = f"{config.mqtt.client_id or f'lineguard-{config.agent_id}'}-commands"
        self._client = make_client(config.mqtt, client_id)
        self._client.on_connect = lambda client, *_: client.subscribe(self._topic, qos=1)
        self._client.on_message = self._on_message
        self._client.connect_async(config.mqtt.host, config.mqtt.port, keepalive=config.mqtt.keepalive_s)
        self._client.loop_start()

    def _on_message(self, _client: object, _userdata: object, message: object) -> None:
        try:
            command = json.loads(message.payload)  # type: ignore[attr-defined]
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("ignored a model command that is not JSON on %s", self._topic)
            return
        if isinstance(command, dict):
            threading.Thread(target=self._run, args=(command,), daemon=True).start()

    def _run(self, command: dict[str, object]) -> None:
        with self._lock:
            self._handle(command)  # type: ignore[operator]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def run(config: AgentConfig, stop: threading.Event) -> int:
    """The models process body."""
    context = zmq.Context()
    deployments = Deployments(config, context)
    try:
        while not stop.wait(1.0):
            deployments.heartbeat()
    finally:
        deployments.close()
        context.term()
    return 0
