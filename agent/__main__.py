"""`lineguard-agent`: run the inspection pipeline, or check a configuration.

    lineguard-agent run --config agent.toml
    lineguard-agent check-config --config agent.toml
    lineguard-agent watch --config agent.toml [--count N]
    lineguard-agent activate --config agent.toml BUNDLE    (swap a new model in, with canary)
    lineguard-agent rollback --config agent.toml [--model MODEL_ID]   (with several models: which one)
    lineguard-agent samples list|label|export --config agent.toml ...   (the sample store; see README)
Exit codes: 0 clean stop, 1 a process kept failing, 2 bad configuration or bundle (message says the fix).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from .bundle import BundleError, Manifest, verify_bundle
from .capture.sequence import SequenceError
from .config import AgentConfig, ConfigError, load_config, read_worker_config, write_worker_config
from .ring import RingRefused
from .rollout.store import serving_bundles
from .signing import KeyFileError, SignatureError, load_trusted_keys

log = logging.getLogger("lineguard.agent")


def preflight(config: AgentConfig) -> dict[str, Manifest]:
    """Checks that need I/O, before any process starts: every model's bundle verifies and has its model id.

    Returns model slot -> manifest (config.model_bundles). Whether each camera's frames fit its model (ROI,
    aspect) is checked by the engine once it sees the frame size; any pixel format feeds a grey or a colour
    model (agent/model_input.py).
    """
    trusted = load_trusted_keys(config.engine.trusted_keys)
    manifests = {}
    for slot, bundle in serving_bundles(config).items():
        manifest = verify_bundle(bundle, trusted, require_signature=config.engine.require_signature)
        if slot and manifest.model_id != slot:
            msg = f"models.bundle of model {slot} is {bundle}, a bundle of model {manifest.model_id}; fix models.id or the path"
            raise BundleError(msg)
        manifests[slot] = manifest
    return manifests


def _models_text(config: AgentConfig, manifests: dict[str, Manifest]) -> str:
    """`model brick@1.0.0` or, with several models, `models brick@1.0.0 (top, side), cap@2.0.0 (lid)`."""
    labels = {slot: f"{manifest.model_id}@{manifest.model_version}" for slot, manifest in manifests.items()}
    if len(labels) == 1:
        return f"model {next(iter(labels.values()))}"
    return "models " + ", ".join(f"{label} ({', '.join(config.cameras_of(slot))})" for slot, label in labels.items())


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _stop_when_orphaned(stop: threading.Event, parent: int) -> None:
    """A worker whose supervisor died (SIGKILL, crash) stops too, instead of running on unsupervised.

    parent: the supervisor's pid as the supervisor gave it; reading getppid() here instead would
    miss a supervisor that died while this worker was still starting.
    """

    def watch_parent() -> None:
        while not stop.wait(1.0):
            if os.getppid() != parent:
                log.error("supervisor (pid %d) is gone; stopping", parent)
                stop.set()

    threading.Thread(target=watch_parent, name="orphan-watch", daemon=True).start()


def _cmd_run(args: argparse.Namespace) -> int:
    from .supervisor import Supervisor

    config = load_config(args.config)
    manifests = preflight(config)
    log.info("agent %s on line %s: %s", config.agent_id, config.line, _models_text(config, manifests))
    config.run_dir.mkdir(parents=True, exist_ok=True)
    config_json = config.run_dir / "config.json"
    secrets = write_worker_config(config, config_json)
    supervisor = Supervisor(config, config_json, worker_env=secrets)
    _stop_on_signals(supervisor.stop_event)
    return supervisor.run()


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    manifests = preflight(config)
    print(f"configuration OK: {len(config.cameras)} camera(s), {_models_text(config, manifests)}")
    return 0


def _cmd_activate(args: argparse.Namespace) -> int:
    from .rollout.swap import activate

    os.nice(10)  # verifying and copying a bundle must not take CPU from the running pipeline
    print(activate(load_config(args.config), args.bundle))
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from .rollout.swap import rollback

    os.nice(10)
    label = rollback(load_config(args.config), model_id=args.model)
    print(f"rolled back: {label} is serving")
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    from .watch import watch

    summary = watch(load_config(args.config), count=args.count, timeout_s=args.timeout)
    return 0 if summary.total else 1


def _cmd_status(args: argparse.Namespace) -> int:
    from .health_report import report

    return report(load_config(args.config), sys.stdout)


def _cmd_worker(args: argparse.Namespace) -> int:
    """One pipeline process, started by the supervisor."""
    from .supervisor import EXIT_FATAL

    config = read_worker_config(args.config_json)
    stop = threading.Event()
    _stop_on_signals(stop)
    _stop_when_orphaned(stop, args.supervisor_pid or os.getppid())
    try:
        if args.role == "capture":
            from .capture.process import run as run_capture

            return run_capture(config, args.camera, stop)
        if args.role == "rollout":
            from .rollout.worker import run as run_rollout

            return run_rollout(config, stop)
        if args.role == "engine":
            from .engine.process import run as run_engine

            return run_engine(config, stop)
        from .decision.process import run as run_decision

        return run_decision(config, stop)
    except (BundleError, SignatureError, KeyFileError, ConfigError, RingRefused, SequenceError) as error:
        log.error("%s cannot start: %s", args.role, error)
        return EXIT_FATAL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lineguard-agent", description="Lineguard inspection agent")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler, help_text in (
        ("run", _cmd_run, "run the pipeline until SIGTERM"),
        ("check-config", _cmd_check_config, "validate the configuration and the bundle, then exit"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", type=Path, help="agent.toml (LINEGUARD_* environment variables override it)")
        sub.set_defaults(handler=handler)
    activator = commands.add_parser("activate", help="install a bundle and swap it into the running agent")
    activator.add_argument("bundle", type=Path, help="bundle directory")
    activator.add_argument("--config", type=Path, help="the running agent's agent.toml")
    activator.set_defaults(handler=_cmd_activate)
    roller = commands.add_parser("rollback", help="swap the running agent back to its previous model")
    roller.add_argument("--config", type=Path, help="the running agent's agent.toml")
    roller.add_argument("--model", default="", help="the model id to roll back (needed when cameras have several)")
    roller.set_defaults(handler=_cmd_rollback)
    watcher = commands.add_parser("watch", help="print this agent's verdicts from the broker, then a summary")
    watcher.add_argument("--config", type=Path, help="the agent's agent.toml (for broker and topics)")
    watcher.add_argument("--count", type=int, default=10**9, help="stop after this many verdicts")
    watcher.add_argument("--timeout", type=float, default=3600.0, help="stop after this many seconds")
    watcher.set_defaults(handler=_cmd_watch)
    status = commands.add_parser("status", help="this agent's health at a glance (exit 0 ok, 1 degraded, 2 failing)")
    status.add_argument("--config", type=Path, help="the running agent's agent.toml")
    status.set_defaults(handler=_cmd_status)
    from .samples.cli import add_samples_parser

    add_samples_parser(commands)
    worker = commands.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("role", choices=("capture", "engine", "decision", "rollout"))
    worker.add_argument("camera", nargs="?", default="")
    worker.add_argument("--config-json", type=Path, required=True)
    worker.add_argument("--supervisor-pid", type=int, default=0)
    worker.set_defaults(handler=_cmd_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.handler(args)
    except (ConfigError, BundleError, SignatureError, KeyFileError) as error:
        print(f"lineguard-agent: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
