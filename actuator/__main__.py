"""`lineguard-actuator`: turn verdicts into rejected parts, or check a configuration.

    lineguard-actuator run --config actuator.toml
    lineguard-actuator check-config --config actuator.toml
Exit codes: 0 clean stop, 1 start-up could not finish (broker or agent not there yet; systemd retries),
2 bad configuration, a reject delay that cannot be met, or an output that cannot exist here (the message
names the keys).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from lineguard.agent.contract import ActuatorStatus, Topics
from lineguard.agent.mqtt import MqttError, Will

from .config import ActuatorConfig, ConfigError, load_config
from .outputs import OutputUnavailable, make_output

log = logging.getLogger("lineguard.actuator")


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    sources = ", ".join(f"{s.agent} {list(s.cameras)}" for s in config.sources)
    print(f"configuration OK: {config.mode} mode, output {config.output.kind}, sources {sources}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .link import Inbox, MqttLink
    from .service import Actuator, CounterReader
    from .startup import StartupError, check_budget, prepare

    config = load_config(args.config)
    stop = threading.Event()
    _stop_on_signals(stop)
    output = make_output(config)
    topics = Topics(config.mqtt.topic_prefix)
    status_topic = topics.actuator_status(config.actuator_id)
    will = ActuatorStatus(
        actuator_id=config.actuator_id,
        line=config.line,
        online=False,
        state="stopped",
        reason="connection lost",
        output=config.output.kind,
        mode=config.mode,
        ts=time.time(),
    )
    filters = [topics.verdict(config.line, "+", "+"), topics.actuator_probe(config.actuator_id)]
    filters += [topics.status(source.agent) for source in config.sources]
    inbox = Inbox()
    link = MqttLink(
        config.mqtt,
        config.mqtt.client_id or f"lineguard-actuator-{config.actuator_id}",
        filters,
        inbox,
        will=Will(status_topic, will.encode()),
    )
    counter = CounterReader(config) if config.mode == "count" else None
    actuator = None
    try:
        ready = prepare(config, link, inbox)
        check_budget(config, ready.deadlines, ready.rtt_s)
        actuator = Actuator(config, output, link, inbox, deadlines=ready.deadlines, counter=counter)
        actuator.metrics.mqtt_rtt.set(ready.rtt_s)
        actuator.run(stop, first=ready.held)
    except StartupError as error:
        log.error("cannot start: %s", error)
        return 1
    finally:
        last = (status_topic, actuator.status(online=False, reason="stopped").encode()) if actuator else None
        output.close()
        if counter is not None:
            counter.close()
        link.close(last)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lineguard-actuator", description="Lineguard reject actuator")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (one line per pulse)")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler, help_text in (
        ("run", _cmd_run, "act on verdicts until SIGTERM"),
        ("check-config", _cmd_check_config, "validate the configuration, then exit"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", type=Path, help="actuator.toml (LINEGUARD_ACTUATOR_* variables override it)")
        sub.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # it logs every failed connect; we say it once
        logging.getLogger("asyncua").setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except (ConfigError, OutputUnavailable) as error:
        print(f"lineguard-actuator: error: {error}", file=sys.stderr)
        return 2
    except MqttError as error:
        print(f"lineguard-actuator: error: {error}", file=sys.stderr)
        return 1


__all__ = ["ActuatorConfig", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
