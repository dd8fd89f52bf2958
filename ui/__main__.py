"""`lineguard-ui`: the line dashboard.

    lineguard-ui run --config ui.toml            serve the page until SIGTERM
    lineguard-ui check-config --config ui.toml   validate the config, users file and label key, then exit
    lineguard-ui add-user NAME --users-file FILE add or replace a user (password from a prompt or stdin)
Exit codes: 0 clean stop, 1 unexpected failure, 2 bad configuration (the message names the key or file and the fix).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import uvicorn

from lineguard.agent.config import ConfigError
from lineguard.agent.mqtt import MqttError
from lineguard.agent.supervisor import SystemdNotifier

from .auth import AuthError, Users, add_user, load_session_key
from .config import UiConfig, load_config
from .labels import LabelRefused
from .store import StoreError

log = logging.getLogger("lineguard.ui")
SETUP_ERRORS = (ConfigError, StoreError, AuthError, LabelRefused, MqttError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lineguard-ui", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "serve the dashboard"), ("check-config", "validate and exit")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--config", type=Path, help="ui.toml (LINEGUARD_UI_ variables override it)")
    adding = commands.add_parser("add-user", help="add or replace a user who may label and acknowledge")
    adding.add_argument("name")
    adding.add_argument("--users-file", type=Path, required=True)
    adding.add_argument("--password-stdin", action="store_true", help="read the password from stdin (scripts)")
    return parser


def serve(config: UiConfig) -> int:
    from .app import create_app
    from .dashboard import build

    dashboard = build(config)
    notifier = SystemdNotifier()
    app = create_app(dashboard, on_ready=lambda: notifier.notify("READY=1"))
    http = config.http
    scheme = "https" if http.tls_cert else "http"
    log.info("dashboard on %s://%s:%d%s/ (line %s)", scheme, http.host, http.port, http.root_path, config.line)
    if http.host not in ("127.0.0.1", "localhost", "::1") and not http.tls_cert:
        log.warning(
            "serving on %s without TLS: logins cross the network in clear; put an HTTPS proxy in front", http.host
        )
    server = _Server(
        uvicorn.Config(
            app,
            host=http.host,
            port=http.port,
            ssl_certfile=str(http.tls_cert) if http.tls_cert else None,
            ssl_keyfile=str(http.tls_key) if http.tls_key else None,
            log_config=None,
            access_log=False,
            proxy_headers=False,
            timeout_graceful_shutdown=3,
        )
    )
    server.run()
    notifier.notify("STOPPING=1")
    return 0 if server.started else 1


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM after its graceful shutdown (exit status -15); a clean stop here exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


def check(config: UiConfig) -> None:
    """What `run` reads before it serves: the users file, the session key folder, the label key."""
    from lineguard.agent.signing import KeyFileError, load_private_key

    users = Users(config.auth.users_file)
    load_session_key(config.state_dir / "session.key")
    if config.label_key is not None:
        try:
            load_private_key(config.label_key)
        except KeyFileError as error:
            msg = f"label_key: {error}"
            raise LabelRefused(msg) from error
    print(
        f"configuration OK: line {config.line}, {len(users)} user(s), labelling {'on' if config.label_key else 'off'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "add-user":
            password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass("password: ")
            add_user(args.users_file, args.name, password)
            print(f"{args.name} can now log in; restart lineguard-ui to read {args.users_file}")
            return 0
        config = load_config(args.config)
        if args.command == "check-config":
            check(config)
            return 0
        return serve(config)
    except (*SETUP_ERRORS, ValueError) as error:
        print(f"lineguard-ui: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
