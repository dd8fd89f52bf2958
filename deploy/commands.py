"""The operator's signed requests to one agent: push a bundle, roll back; each waits for the agent's ModelEvent.

`lineguard-deploy push/rollback` and the fleet rollout (deploy/rollout.py) both go through here, so a push or a
rollback means the same thing whether it is for one agent or a wave of them.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lineguard.agent.authority import sign_command
from lineguard.agent.contract import ContractError, ModelCommand, ModelEvent, Record, Topics, TransferMeta, clip, decode
from lineguard.agent.mqtt import Subscription
from lineguard.agent.mqtt.client import OnMessage
from lineguard.agent.signing import KeyFileError, load_private_key
from lineguard.deploy.config import DeployConfig
from lineguard.deploy.sender import BundleSender, ProgressCallback, TransferResult

EVENT_WAIT_S = 5.0  # the agent's ModelEvent follows its final ack at once

R = TypeVar("R", bound=Record)


def operator_key(config: DeployConfig) -> Ed25519PrivateKey:
    """The key that signs pushes and commands; KeyFileError saying how to give one."""
    if config.operator_key is None:
        msg = "pushes and commands must be signed: pass --operator-key KEY.pem or set LINEGUARD_OPERATOR_KEY"
        raise KeyFileError(msg)
    return load_private_key(config.operator_key)


def records(record_type: type[R], handle: Callable[[R], None]) -> OnMessage:
    """An on_message that decodes each payload as `record_type` for `handle`, and reports (bounded) what it cannot."""

    def on_message(topic: str, payload: bytes, properties: object) -> None:
        try:
            record = decode(record_type, payload)
        except ContractError as error:
            print(f"lineguard-deploy: ignored a message on {clip(topic, 200)}: {error}", file=sys.stderr)
            return
        handle(record)

    return on_message


def push_command(
    key: Ed25519PrivateKey, agent: str, *, allow_downgrade: bool
) -> Callable[[TransferMeta], ModelCommand]:
    """Makes the signed push command for a transfer's meta (BundleSender.send's `command`)."""

    def command(meta: TransferMeta) -> ModelCommand:
        request_id, nonce = ModelCommand.new_ids()
        unsigned = ModelCommand(
            action="push",
            agent_id=agent,
            request_id=request_id,
            model=meta.model,
            sha256=meta.sha256,
            allow_downgrade=allow_downgrade,
            issued_ts=time.time(),
            nonce=nonce,
        )
        return sign_command(unsigned, key)

    return command


@dataclass(frozen=True, slots=True)
class PushOutcome:
    """A push the agent accepted, and its ModelEvent (None when none was heard within EVENT_WAIT_S)."""

    result: TransferResult
    event: ModelEvent | None


@dataclass(frozen=True, slots=True)
class PushRequest:
    """One signed push of `bundle` to `agent`."""

    bundle: Path
    agent: str
    timeout_s: float
    allow_downgrade: bool = False


def push(
    config: DeployConfig, key: Ed25519PrivateKey, request: PushRequest, progress: ProgressCallback | None = None
) -> PushOutcome:
    """Push and wait for the agent's verdict; TransferError when it refuses (`.reason`) or does not answer."""
    events: dict[str, ModelEvent] = {}  # transfer id -> the agent's event: it carries the shadow numbers
    heard = threading.Event()

    def keep_event(event: ModelEvent) -> None:
        if event.request_id not in events or event.shadow is not None:  # a repeated verdict never hides the shadow
            events[event.request_id] = event
        heard.set()

    topics = Topics(config.mqtt.topic_prefix)
    client_id = f"lineguard-deploy-{uuid.uuid4().hex[:8]}"
    with Subscription(config.mqtt, client_id, [topics.model_events(request.agent)], records(ModelEvent, keep_event)):
        with BundleSender(config.mqtt) as sender:
            result = sender.send(
                request.bundle,
                agent_id=request.agent,
                timeout_s=request.timeout_s,
                progress=progress,
                command=push_command(key, request.agent, allow_downgrade=request.allow_downgrade),
            )
        deadline = time.monotonic() + EVENT_WAIT_S
        while result.transfer_id not in events and heard.wait(max(0.0, deadline - time.monotonic())):
            heard.clear()
    return PushOutcome(result, events.get(result.transfer_id))


def rollback(
    config: DeployConfig, key: Ed25519PrivateKey, agent: str, *, to: str = "", timeout_s: float
) -> ModelEvent | None:
    """Ask `agent` to swap back to `to` (its previous model when empty); its answer, None when none in timeout_s."""
    request_id, nonce = ModelCommand.new_ids()
    unsigned = ModelCommand(
        action="rollback", agent_id=agent, request_id=request_id, model=to, issued_ts=time.time(), nonce=nonce
    )
    return request(config, sign_command(unsigned, key), timeout_s)


def request(config: DeployConfig, command: ModelCommand, timeout_s: float) -> ModelEvent | None:
    """Publish a command and wait for the event that answers it."""
    topics = Topics(config.mqtt.topic_prefix)
    answered = threading.Event()
    answers: list[ModelEvent] = []

    def keep_answer(event: ModelEvent) -> None:
        if event.request_id == command.request_id:
            answers.append(event)
            answered.set()

    client_id = f"lineguard-deploy-{command.request_id[:8]}"
    on_event = records(ModelEvent, keep_answer)
    with Subscription(config.mqtt, client_id, [topics.model_events(command.agent_id)], on_event) as listener:
        listener.publish(topics.model_command(command.agent_id), command.encode(), qos=1).wait_for_publish(10)
        return answers[0] if answered.wait(timeout_s) else None
