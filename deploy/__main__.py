"""`lineguard-deploy`: push signed models to running agents, roll back, see what runs where.

    lineguard-deploy push BUNDLE --agent ID      transfer in checksummed chunks (resumable), wait for the verdict
    lineguard-deploy rollback --agent ID [--to MODEL]   the agent swaps back to its previous model (or MODEL)
    lineguard-deploy label LABEL SAMPLE_ID... --agent ID   label samples the agent stored (ok, nok, unsure)
    lineguard-deploy rollout BUNDLE --agents SELECTOR [--waves 1,25%,100%] [--soak S] [--abort-if RULES]
                                                 waves to a fleet, halted and rolled back on trouble (resumable)
    lineguard-deploy status [--agent ID]         the fleet: line, cameras, model per camera, back end, fps, failsafes
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
from collections.abc import Sequence
from pathlib import Path

from lineguard.agent.authority import sign_command
from lineguard.agent.bundle import BundleError
from lineguard.agent.config import ConfigError
from lineguard.agent.contract import ContractError, ModelEvent, SampleLabel, SampleLabelResult, Topics
from lineguard.agent.mqtt import MqttError, Subscription
from lineguard.agent.rollout.wire import ArchiveError, TransferError
from lineguard.agent.samples.labels import new_label
from lineguard.agent.signing import KeyFileError, generate_key_pair, key_id, load_public_key
from lineguard.deploy.commands import EVENT_WAIT_S, PushRequest, operator_key, push, records, rollback
from lineguard.deploy.config import DeployConfig, load_deploy_config
from lineguard.deploy.fleet import TABLE_HEADER, AgentView, FleetWatch, fleet_rows, format_table
from lineguard.deploy.plan import PlanError
from lineguard.deploy.rollout import RolloutOptions, run_rollout
from lineguard.deploy.rollout_state import StateFileError, default_state_path
from lineguard.deploy.sender import TransferProgress

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


def _cmd_push(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    config = _config(args)
    key = operator_key(config)
    bar = tqdm(unit="B", unit_scale=True, desc=f"push to {args.agent}", disable=not sys.stderr.isatty())

    def progress(state: TransferProgress) -> None:
        bar.total = state.total_bytes
        bar.n = state.bytes_received
        bar.refresh()

    try:
        request = PushRequest(args.bundle, args.agent, args.timeout, allow_downgrade=args.allow_downgrade)
        outcome = push(config, key, request, progress)
    finally:
        bar.close()
    result = outcome.result
    print(
        f"{result.model} accepted by {args.agent}: {result.reason} ({result.chunks_sent} chunks, {result.elapsed_s:.1f} s)"
    )
    print(_shadow_line(outcome.event, result.model))
    return 0


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
    answer = rollback(config, operator_key(config), args.agent, to=args.to, timeout_s=args.timeout)
    if answer is None:
        print(f"lineguard-deploy: no answer from {args.agent} within {args.timeout:.0f} s", file=sys.stderr)
        return EXIT_TIMEOUT
    print(f"{args.agent}: {answer.outcome}: {answer.reason}")
    return 0 if answer.outcome == "accepted" else EXIT_REFUSED


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        msg = f"must be a whole number >= 1, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return int(text)


def _cmd_rollout(args: argparse.Namespace) -> int:
    config = _config(args)
    options = RolloutOptions(
        bundle=args.bundle,
        selector=args.agents,
        waves=args.waves,
        abort_if=args.abort_if,
        soak_s=args.soak,
        canary=args.canary,
        baseline_s=args.baseline,
        silence_s=args.silence,
        push_timeout_s=args.timeout,
        parallel=args.parallel,
        state_path=args.state or default_state_path(),
        wait_s=args.wait,
        min_frames=args.min_frames,
    )
    return run_rollout(config, operator_key(config), options)


def _cmd_label(args: argparse.Namespace) -> int:
    config = _config(args)
    key = operator_key(config)
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
        config.mqtt, client_id, [topics.sample_events(agent)], records(SampleLabelResult, keep)
    ) as listener:
        for label in labels:
            listener.publish(topics.sample_label(agent), label.encode(), qos=1).wait_for_publish(10)
        done.wait(timeout_s)
    return answers


def _retained_statuses(config: DeployConfig, agent: str, wait_s: float) -> dict[str, AgentView]:
    """What the broker says of the agents (all, or one) within wait_s: retained statuses and live verdicts."""
    with FleetWatch(config, None if agent == "+" else [agent]) as watch:
        time.sleep(wait_s)
        return {name: view for name, view in watch.snapshot().items() if view.status is not None}


def _cmd_status(args: argparse.Namespace) -> int:
    views = _retained_statuses(_config(args), args.agent or "+", args.wait)
    if views:
        print(format_table(TABLE_HEADER, fleet_rows(views)))
    return 0 if views else EXIT_TIMEOUT


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


DEFAULT_ABORT = "failsafe>2%,reject>+5pp"
ROLLOUT_HELP = """Push BUNDLE to the agents SELECTOR names, wave by wave; see README "Rolling out to a fleet".

selector:  line=L (glob), agent ids or globs on them, comma-separated (any term matches)
waves:     cumulative sizes, a count or a share: 1,25%,100% (the first wave is the canary; the last must be 100%)
abort-if:  failsafe>N% | reject>N% (absolute) | failsafe>+Npp | reject>+Npp (points above the previous model)
Resumes from the state file when re-run with the same bundle. Exit: 0 every wave passed; 2 halted, the wave
rolled back (or bad input); 3 halted and a rollback failed or went unanswered (the table names the agents)."""


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
    rollout = commands.add_parser(
        "rollout",
        help="push a bundle to a fleet in waves: canary first, soak, halt and roll back a wave on trouble",
        description=ROLLOUT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rollout.add_argument("bundle", type=Path)
    rollout.add_argument("--agents", required=True, metavar="SELECTOR", help="line=L, agent ids or globs, comma list")
    rollout.add_argument("--waves", default="1,25%,100%", help="cumulative wave sizes (default 1,25%%,100%%)")
    rollout.add_argument("--soak", type=float, default=300.0, metavar="S", help="seconds each wave is watched")
    rollout.add_argument(
        "--abort-if",
        default=DEFAULT_ABORT,
        metavar="RULES",
        help=f"halt rules (default {DEFAULT_ABORT.replace('%', '%%')}; '' = none)",
    )
    rollout.add_argument(
        "--min-frames", type=int, default=20, metavar="N", help="rules judge an agent after N verdicts (default 20)"
    )
    rollout.add_argument("--canary", default="", metavar="ID", help="the agent of the first wave (default: first id)")
    rollout.add_argument("--baseline", type=float, default=10.0, metavar="S", help="listen before the first push")
    rollout.add_argument("--silence", type=float, default=15.0, metavar="S", help="no status this long = not answering")
    rollout.add_argument("--timeout", type=float, default=600.0, help="per push and per rollback, seconds")
    rollout.add_argument(
        "--parallel",
        type=_at_least_one,
        default=8,
        metavar="N",
        help="pushes of one wave in flight at once (default 8)",
    )
    rollout.add_argument("--state", type=Path, help=f"state file (default {default_state_path()})")
    status = commands.add_parser("status", help="the fleet: agents, lines, cameras, models, back ends, fps, failsafes")
    status.add_argument("--agent")
    listing = commands.add_parser("list", help="agents seen on the broker")
    for sub, handler in (
        (push, _cmd_push),
        (rollback, _cmd_rollback),
        (rollout, _cmd_rollout),
        (labeller, _cmd_label),
        (status, _cmd_status),
        (listing, _cmd_list),
    ):
        _add_broker_arguments(sub)
        sub.set_defaults(handler=handler)
    for sub in (push, rollback, rollout, labeller):
        sub.add_argument("--operator-key", type=Path, help="Ed25519 key that signs (default LINEGUARD_OPERATOR_KEY)")
    for sub in (status, listing, rollout):
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
    except (
        BundleError,
        ArchiveError,
        KeyFileError,
        ConfigError,
        ContractError,
        PlanError,
        StateFileError,
        OSError,
    ) as error:
        print(f"lineguard-deploy: error: {error}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
