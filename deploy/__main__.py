"""`lineguard-deploy`: push signed models to running agents, roll back, see what runs where.

    lineguard-deploy push BUNDLE --agent ID      transfer in checksummed chunks (resumable), wait for the verdict
    lineguard-deploy rollback --agent ID         the agent swaps back to its previous model
    lineguard-deploy status [--agent ID]         retained status of the agents on the broker
    lineguard-deploy list                        agents seen on the broker
    lineguard-deploy keygen KEY                  Ed25519 signing key pair
    lineguard-deploy trust KEY.pub --dir DIR     add a public key to a directory of trusted keys
Broker: --host/--port/--username/--tls-* or LINEGUARD_MQTT__* (password: LINEGUARD_MQTT__PASSWORD).
Exit codes: 0 done, 2 refused or bad input (the reason is printed), 3 no answer in time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from lineguard.agent.bundle import BundleError
from lineguard.agent.config import MqttConfig
from lineguard.agent.signing import KeyFileError, generate_key_pair, key_id, load_public_key
from lineguard.agent.transfer import BundleSender, TransferError, make_client

EXIT_REFUSED, EXIT_TIMEOUT = 2, 3


def _mqtt_config(args: argparse.Namespace) -> MqttConfig:
    import os

    values = {
        "host": args.host or os.environ.get("LINEGUARD_MQTT__HOST", "127.0.0.1"),
        "port": args.port or int(os.environ.get("LINEGUARD_MQTT__PORT", "1883")),
        "username": args.username or os.environ.get("LINEGUARD_MQTT__USERNAME", ""),
        "password": os.environ.get("LINEGUARD_MQTT__PASSWORD", ""),
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "topic_prefix": args.topic_prefix,
    }
    return MqttConfig(**values)


def _cmd_push(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    sender = BundleSender(_mqtt_config(args))
    bar = tqdm(unit="B", unit_scale=True, desc=f"push to {args.agent}", disable=not sys.stderr.isatty())

    def progress(state: object) -> None:
        bar.total = state.total_bytes  # type: ignore[attr-defined]
        bar.n = state.bytes_received  # type: ignore[attr-defined]
        bar.refresh()

    try:
        result = sender.send(args.bundle, agent_id=args.agent, timeout_s=args.timeout, progress=progress)
    finally:
        bar.close()
        sender.close()
    print(
        f"{result.model} accepted by {args.agent}: {result.reason} ({result.chunks_sent} chunks, {result.elapsed_s:.1f} s)"
    )
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    config = _mqtt_config(args)
    request_id = uuid.uuid4().hex
    events = f"{config.topic_prefix}/{args.agent}/model/events"
    answer = _request(
        config,
        events,
        request_id,
        f"{config.topic_prefix}/{args.agent}/model/command",
        {"action": "rollback", "request_id": request_id},
        args.timeout,
    )
    if answer is None:
        print(f"lineguard-deploy: no answer from {args.agent} within {args.timeout:.0f} s", file=sys.stderr)
        return EXIT_TIMEOUT
    print(f"{args.agent}: {answer['state']}: {answer['reason']}")
    return 0 if answer["state"] == "rolled-back" else EXIT_REFUSED


def _request(
    config: MqttConfig, events: str, request_id: str, topic: str, payload: dict, timeout_s: float
) -> dict | None:
    """Publish a command and wait for the event that answers it."""
    answered = threading.Event()
    answer: dict = {}

    def on_message(_client: object, _userdata: object, message: object) -> None:
        event = json.loads(message.payload)  # type: ignore[attr-defined]
        if event.get("request_id") == request_id:
            answer.update(event)
            answered.set()

    client = make_client(config, f"lineguard-deploy-{request_id[:8]}")
    subscribed = threading.Event()
    client.on_connect = lambda c, *_: c.subscribe(events, qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = on_message
    client.connect(config.host, config.port)
    client.loop_start()
    try:
        if not subscribed.wait(10):
            return None
        client.publish(topic, json.dumps(payload), qos=1).wait_for_publish(10)
        return answer if answered.wait(timeout_s) else None
    finally:
        client.disconnect()
        client.loop_stop()


def _retained_statuses(config: MqttConfig, agent: str, wait_s: float) -> dict[str, dict]:
    """Retained status messages: agent id -> status JSON."""
    statuses: dict[str, dict] = {}
    client = make_client(config, f"lineguard-deploy-{uuid.uuid4().hex[:8]}")
    client.on_connect = lambda c, *_: c.subscribe(f"{config.topic_prefix}/{agent}/status", qos=1)

    def on_message(_client: object, _userdata: object, message: object) -> None:
        try:
            statuses[message.topic.split("/")[-2]] = json.loads(message.payload)  # type: ignore[attr-defined]
        except (json.JSONDecodeError, UnicodeDecodeError):
            return

    client.on_message = on_message
    client.connect(config.host, config.port)
    client.loop_start()
    time.sleep(wait_s)
    client.disconnect()
    client.loop_stop()
    return statuses


def _cmd_status(args: argparse.Namespace) -> int:
    statuses = _retained_statuses(_mqtt_config(args), args.agent or "+", args.wait)
    for agent, status in sorted(statuses.items()):
        state = "online" if status.get("online") else "OFFLINE"
        print(
            f"{agent}: {state}, model {status.get('model', '—')}, fps {status.get('fps', {})}, queue {status.get('queue_depth', '—')}"
        )
    return 0 if statuses else EXIT_TIMEOUT


def _cmd_list(args: argparse.Namespace) -> int:
    statuses = _retained_statuses(_mqtt_config(args), "+", args.wait)
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
    print(f"trusted {target}: add it to engine.trusted_keys of the agent's config")
    return 0


def _add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("broker")
    group.add_argument("--host", help="broker host (default LINEGUARD_MQTT__HOST or 127.0.0.1)")
    group.add_argument("--port", type=int, help="broker port (default LINEGUARD_MQTT__PORT or 1883)")
    group.add_argument("--username", help="operator user name (password from LINEGUARD_MQTT__PASSWORD)")
    group.add_argument("--tls-ca", type=Path)
    group.add_argument("--tls-cert", type=Path)
    group.add_argument("--tls-key", type=Path)
    group.add_argument("--topic-prefix", default="lineguard")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lineguard-deploy", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="push a bundle to an agent and wait for its verdict")
    push.add_argument("bundle", type=Path)
    push.add_argument("--agent", required=True)
    push.add_argument("--timeout", type=float, default=600.0)
    rollback = commands.add_parser("rollback", help="swap an agent back to its previous model")
    rollback.add_argument("--agent", required=True)
    rollback.add_argument("--timeout", type=float, default=120.0)
    status = commands.add_parser("status", help="retained status of one agent or all")
    status.add_argument("--agent")
    listing = commands.add_parser("list", help="agents seen on the broker")
    for sub, handler in ((push, _cmd_push), (rollback, _cmd_rollback), (status, _cmd_status), (listing, _cmd_list)):
        _add_broker_arguments(sub)
        sub.set_defaults(handler=handler)
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
        print(f"lineguard-deploy: refused: {error}", file=sys.stderr)
        return EXIT_TIMEOUT if "timed out" in str(error) or "no answer" in str(error) else EXIT_REFUSED
    except (BundleError, KeyFileError, ValidationError, OSError) as error:
        print(f"lineguard-deploy: error: {error}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
