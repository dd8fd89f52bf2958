"""`lineguard-deploy`: push signed models to running agents, roll back, see what runs where.

    lineguard-deploy push BUNDLE --agent ID      transfer in checksummed chunks (resumable), wait for the verdict
    lineguard-deploy rollback --agent ID [--to MODEL]   the agent swaps back to its previous model (or MODEL)
    lineguard-deploy label LABEL SAMPLE_ID... --agent ID   label samples the agent stored (ok, nok, unsure)
    lineguard-deploy status [--agent ID]         retained status of the agents on the broker
    lineguard-deploy list                        agents seen on the broker
    lineguard-deploy keygen KEY                  Ed25519 signing key pair
    lineguard-deploy trust KEY.pub --dir DIR     add a public key to a directory of trusted keys
Broker: --host/--port/--username/--tls-* or LINEGUARD_MQTT__* (password: LINEGUARD_MQTT__PASSWORD).
Pushes and rollbacks are signed with the operator's key: --operator-key or LINEGUARD_OPERATOR_KEY.
Exit codes: 0 done, 2 refused or bad input (the reason is printed), 3 no answer in time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lineguard.agent.authority import sign_command
from lineguard.agent.bundle import BundleError
from lineguard.agent.config import ConfigError
from lineguard.agent.contract import (
    AgentStatus,
    ContractError,
    ModelCommand,
    ModelEvent,
    Record,
    SampleLabel,
    SampleLabelResult,
    Topics,
    TransferMeta,
    clip,
    decode,
)
from lineguard.agent.mqtt import MqttError, Subscription
from lineguard.agent.mqtt.client import OnMessage
from lineguard.agent.rollout.wire import ArchiveError, TransferError
from lineguard.agent.samples.labels import new_label
from lineguard.agent.signing import KeyFileError, generate_key_pair, key_id, load_private_key, load_public_key
from lineguard.deploy.config import DeployConfig, load_deploy_config
from lineguard.deploy.sender import BundleSender

EXIT_REFUSED, EXIT_TIMEOUT = 2, 3


def _config(args: argparse.Namespace) -> DeployConfig:
    flags = {
        "host": args.host,
        "port": args.port,
        "username": args.username,
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "topic_prefix": args.topic_prefix,
    }
    return load_deploy_config(mqtt=flags, operator_key=getattr(args, "operator_key", None))


def _operator_key(config: DeployConfig) -> Ed25519PrivateKey:
    if config.operator_key is None:
        msg = "pushes and commands must be signed: pass --operator-key KEY.pem or set LINEGUARD_OPERATOR_KEY"
        raise KeyFileError(msg)
    return load_private_key(config.operator_key)


def _push_command(
    key: Ed25519PrivateKey, agent: str, *, allow_downgrade: bool
) -> Callable[[TransferMeta], ModelCommand]:
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


def _cmd_push(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    config = _config(args)
    command = _push_command(_operator_key(config), args.agent, allow_downgrade=args.allow_downgrade)
    events: dict[str, ModelEvent] = {}  # transfer id -> the agent's event: it carries the shadow numbers
    heard = threading.Event()

    def keep_event(event: ModelEvent) -> None:
        if event.request_id not in events or event.shadow is not None:  # a repeated verdict never hides the shadow
            events[event.request_id] = event
        heard.set()

    topics = Topics(config.mqtt.topic_prefix)
    listener = Subscription(
        config.mqtt,
        f"lineguard-deploy-{uuid.uuid4().hex[:8]}",
        [topics.model_events(args.agent)],
        _records(ModelEvent, keep_event),
    )
    sender = BundleSender(config.mqtt)
    bar = tqdm(unit="B", unit_scale=True, desc=f"push to {args.agent}", disable=not sys.stderr.isatty())

    def progress(state: object) -> None:
        bar.total = state.total_bytes  # type: ignore[attr-defined]
        bar.n = state.bytes_received  # type: ignore[attr-defined]
        bar.refresh()

    try:
        result = sender.send(
            args.bundle, agent_id=args.agent, timeout_s=args.timeout, progress=progress, command=command
        )
        deadline = time.monotonic() + EVENT_WAIT_S  # the event follows the final ack at once
        while result.transfer_id not in events and heard.wait(max(0.0, deadline - time.monotonic())):
            heard.clear()
    finally:
        bar.close()
        sender.close()
        listener.close()
    print(
        f"{result.model} accepted by {args.agent}: {result.reason} ({result.chunks_sent} chunks, {result.elapsed_s:.1f} s)"
    )
    print(_shadow_line(events.get(result.transfer_id), result.model))
    return 0


EVENT_WAIT_S = 5.0


def _shadow_line(event: ModelEvent | None, model: str) -> str:
    """What the agent's shadow scoring predicted for the reject rate, in one line."""
    if event is None:
        return f"shadow: no model event heard within {EVENT_WAIT_S:g} s; see the reason above"
    shadow = event.shadow
    if shadow is None:
        return (
            "shadow: none (the agent's engine.shadow_s is 0, or no frame arrived meanwhile): golden-image canary only"
        )
    before, after = 100 * shadow.serving_reject_rate, 100 * shadow.candidate_reject_rate
    return (
        f"shadow: {shadow.frames} live frames scored by both models: reject rate {before:.1f} % with the previous "
        f"model -> {after:.1f} % predicted with {model} ({after - before:+.1f} points)"
    )


def _cmd_rollback(args: argparse.Namespace) -> int:
    config = _config(args)
    request_id, nonce = ModelCommand.new_ids()
    unsigned = ModelCommand(
        action="rollback", agent_id=args.agent, request_id=request_id, model=args.to, issued_ts=time.time(), nonce=nonce
    )
    command = sign_command(unsigned, _operator_key(config))
    answer = _request(config, command, args.timeout)
    if answer is None:
        print(f"lineguard-deploy: no answer from {args.agent} within {args.timeout:.0f} s", file=sys.stderr)
        return EXIT_TIMEOUT
    print(f"{args.agent}: {answer.outcome}: {answer.reason}")
    return 0 if answer.outcome == "accepted" else EXIT_REFUSED


def _cmd_label(args: argparse.Namespace) -> int:
    config = _config(args)
    key = _operator_key(config)
    labels = [
        sign_command(new_label(args.agent, sample_id, args.label, by=args.by, defect_type=args.defect_type), key)
        for sample_id in args.sample_ids
    ]
    answers = _ask_labels(config, labels, args.timeout)
    refused = 0
    for label in labels:
        answer = answers.get(label.request_id)
        if answer is None:
            print(f"{label.sample_id}: no answer from {args.agent} within {args.timeout:.0f} s", file=sys.stderr)
            continue
        refused += answer.outcome != "stored"
        print(f"{label.sample_id}: {answer.outcome}: {answer.reason}")
    if len(answers) < len(labels):
        return EXIT_TIMEOUT
    return EXIT_REFUSED if refused else 0


def _ask_labels(config: DeployConfig, labels: list[SampleLabel], timeout_s: float) -> dict[str, SampleLabelResult]:
    """Publish signed labels; the agent's answers by request id (those heard within timeout_s)."""
    topics = Topics(config.mqtt.topic_prefix)
    agent = labels[0].agent_id
    wanted = {label.request_id for label in labels}
    answers: dict[str, SampleLabelResult] = {}
    done = threading.Event()

    def keep(result: SampleLabelResult) -> None:
        if result.request_id in wanted:
            answers[result.request_id] = result
            if len(answers) == len(wanted):
                done.set()

    client_id = f"lineguard-deploy-{uuid.uuid4().hex[:8]}"
    with Subscription(
        config.mqtt, client_id, [topics.sample_events(agent)], _records(SampleLabelResult, keep)
    ) as listener:
        for label in labels:
            listener.publish(topics.sample_label(agent), label.encode(), qos=1).wait_for_publish(10)
        done.wait(timeout_s)
    return answers


R = TypeVar("R", bound=Record)


def _records(record_type: type[R], handle: Callable[[R], None]) -> OnMessage:
    """An on_message that decodes each payload as `record_type` for `handle`, and reports (bounded) what it cannot."""

    def on_message(topic: str, payload: bytes, properties: object) -> None:
        try:
            record = decode(record_type, payload)
        except ContractError as error:
            print(f"lineguard-deploy: ignored a message on {clip(topic, 200)}: {error}", file=sys.stderr)
            return
        handle(record)

    return on_message


def _request(config: DeployConfig, command: ModelCommand, timeout_s: float) -> ModelEvent | None:
    """Publish a command and wait for the event that answers it."""
    topics = Topics(config.mqtt.topic_prefix)
    answered = threading.Event()
    answers: list[ModelEvent] = []

    def keep_answer(event: ModelEvent) -> None:
        if event.request_id == command.request_id:
            answers.append(event)
            answered.set()

    client_id = f"lineguard-deploy-{command.request_id[:8]}"
    on_event = _records(ModelEvent, keep_answer)
    with Subscription(config.mqtt, client_id, [topics.model_events(command.agent_id)], on_event) as listener:
        listener.publish(topics.model_command(command.agent_id), command.encode(), qos=1).wait_for_publish(10)
        return answers[0] if answered.wait(timeout_s) else None


def _retained_statuses(config: DeployConfig, agent: str, wait_s: float) -> dict[str, AgentStatus]:
    """Retained status messages: agent id -> status."""
    topics = Topics(config.mqtt.topic_prefix)
    statuses: dict[str, AgentStatus] = {}
    on_status = _records(AgentStatus, lambda status: statuses.__setitem__(status.agent_id, status))
    with Subscription(config.mqtt, f"lineguard-deploy-{uuid.uuid4().hex[:8]}", [topics.status(agent)], on_status):
        time.sleep(wait_s)
    return statuses


def _cmd_status(args: argparse.Namespace) -> int:
    statuses = _retained_statuses(_config(args), args.agent or "+", args.wait)
    for agent, status in sorted(statuses.items()):
        state = "online" if status.online else f"OFFLINE ({status.reason})"
        fps = ", ".join(
            f"{camera} {each.fps:g} fps" + ("" if status.model or not each.model else f" ({each.model})")
            for camera, each in sorted(status.cameras.items())
        )
        model = f"model {status.model}" if status.model else "models per camera" if status.cameras else "model —"
        print(f"{agent}: {state}, line {status.line}, {model}, {fps or '—'}, queue {status.queue_depth}")
    return 0 if statuses else EXIT_TIMEOUT


def _cmd_list(args: argparse.Namespace) -> int:
    statuses = _retained_statuses(_config(args), "+", args.wait)
    for agent in sorted(statuses):
        print(agent)
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    private_path, public_path = generate_key_pair(args.key)
    print(
        f"private key {private_path} (keep secret)\npublic key  {public_path} (give to agents: lineguard-deploy trust)"
    )
    return 0


def _cmd_trust(args: argparse.Namespace) -> int:
    key = load_public_key(args.public_key)
    args.dir.mkdir(parents=True, exist_ok=True)
    target = args.dir / f"{key_id(key)}.pub"
    shutil.copyfile(args.public_key, target)
    print(
        f"trusted {target}: add it to the agent's engine.trusted_keys (a trainer's key, signs bundles) or "
        "rollout.operator_keys (an operator's key, signs pushes and commands)"
    )
    return 0


def _add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("broker")
    group.add_argument("--host", help="broker host (default LINEGUARD_MQTT__HOST or 127.0.0.1)")
    group.add_argument("--port", type=int, help="broker port (default LINEGUARD_MQTT__PORT or 1883)")
    group.add_argument("--username", help="operator user name (password from LINEGUARD_MQTT__PASSWORD)")
    group.add_argument("--tls-ca", type=Path, help="default LINEGUARD_MQTT__TLS_CA")
    group.add_argument("--tls-cert", type=Path, help="default LINEGUARD_MQTT__TLS_CERT")
    group.add_argument("--tls-key", type=Path, help="default LINEGUARD_MQTT__TLS_KEY")
    group.add_argument("--topic-prefix", help="default LINEGUARD_MQTT__TOPIC_PREFIX or lineguard")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lineguard-deploy", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="push a bundle to an agent and wait for its verdict")
    push.add_argument("bundle", type=Path)
    push.add_argument("--agent", required=True)
    push.add_argument("--timeout", type=float, default=600.0)
    push.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="install even if older than the newest version of its model id the agent has accepted",
    )
    rollback = commands.add_parser("rollback", help="swap an agent back to its previous model")
    rollback.add_argument("--agent", required=True)
    rollback.add_argument("--timeout", type=float, default=120.0)
    rollback.add_argument(
        "--to", default="", metavar="MODEL", help="model id@version to go back to (default: previous)"
    )
    labeller = commands.add_parser("label", help="label samples an agent stored (signed, like a push)")
    labeller.add_argument("label", choices=("ok", "nok", "unsure"))
    labeller.add_argument("sample_ids", nargs="+", metavar="SAMPLE_ID")
    labeller.add_argument("--agent", required=True)
    labeller.add_argument("--defect-type", default="", help="for nok: e.g. crack, scratch (a-z, 0-9, _ and -)")
    labeller.add_argument("--by", default=os.environ.get("USER", "operator")[:64] or "operator", help="who labels")
    labeller.add_argument("--timeout", type=float, default=30.0)
    status = commands.add_parser("status", help="retained status of one agent or all")
    status.add_argument("--agent")
    listing = commands.add_parser("list", help="agents seen on the broker")
    for sub, handler in (
        (push, _cmd_push),
        (rollback, _cmd_rollback),
        (labeller, _cmd_label),
        (status, _cmd_status),
        (listing, _cmd_list),
    ):
        _add_broker_arguments(sub)
        sub.set_defaults(handler=handler)
    for sub in (push, rollback, labeller):
        sub.add_argument("--operator-key", type=Path, help="Ed25519 key that signs (default LINEGUARD_OPERATOR_KEY)")
    for sub in (status, listing):
        sub.add_argument("--wait", type=float, default=1.5, help="seconds to collect retained messages")
    keygen = commands.add_parser("keygen", help="make an Ed25519 signing key pair")
    keygen.add_argument("key", type=Path)
    keygen.set_defaults(handler=_cmd_keygen)
    trust = commands.add_parser("trust", help="copy a public key into a trusted-keys directory")
    trust.add_argument("public_key", type=Path)
    trust.add_argument("--dir", type=Path, required=True)
    trust.set_defaults(handler=_cmd_trust)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except TransferError as error:
        print(f"lineguard-deploy: {'no answer' if error.timed_out else 'refused'}: {error}", file=sys.stderr)
        return EXIT_TIMEOUT if error.timed_out else EXIT_REFUSED
    except MqttError as error:
        print(f"lineguard-deploy: broker: {error}", file=sys.stderr)
        return EXIT_TIMEOUT
    except (BundleError, ArchiveError, KeyFileError, ConfigError, ContractError, OSError) as error:
        print(f"lineguard-deploy: error: {error}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
