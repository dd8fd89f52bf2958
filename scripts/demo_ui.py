"""Demo helper: the line dashboard (`lineguard-ui`) beside the demo agent, on 127.0.0.1 only.

    dashboard = DemoDashboard.start(out, broker_port)   # prints the URL and the demo login
    ...
    dashboard.hold_open()                               # on a terminal: keep serving until Ctrl-C
    dashboard.stop()

State (SQLite history, alarms, labels) lives in OUT/ui, so a second demo run shows the first one's history.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEMO_USER, DEMO_PASSWORD = "demo", "demo"  # bound to 127.0.0.1: only this machine can reach the page


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class DemoDashboard:
    process: subprocess.Popen[bytes]
    url: str

    @classmethod
    def start(cls, out: Path, broker_port: int) -> DemoDashboard:
        folder = (out / "ui").absolute()
        folder.mkdir(parents=True, exist_ok=True)
        bin_dir = Path(sys.executable).parent
        users = folder / "users"
        if not users.exists():
            subprocess.run(
                [bin_dir / "lineguard-ui", "add-user", DEMO_USER, "--users-file", str(users), "--password-stdin"],
                input=f"{DEMO_PASSWORD}\n".encode(),
                check=True,
                capture_output=True,
            )
        key = folder / "labeller.pem"
        if not key.exists():
            subprocess.run([bin_dir / "lineguard-deploy", "keygen", str(key)], check=True, capture_output=True)
        port = free_port()
        config = folder / "ui.toml"
        config.write_text(
            f'line = "+"\nstate_dir = "{folder / "state"}"\nlabel_key = "{key}"\n\n'
            f'[http]\nhost = "127.0.0.1"\nport = {port}\n\n[mqtt]\nport = {broker_port}\n\n'
            f'[auth]\nusers_file = "{users}"\n'
        )
        log = (folder / "ui.log").open("ab")
        process = subprocess.Popen([bin_dir / "lineguard-ui", "run", "--config", str(config)], stdout=log, stderr=log)
        dashboard = cls(process, f"http://127.0.0.1:{port}/")
        dashboard._wait_until_up(folder / "ui.log")
        print(f"dashboard: {dashboard.url}  (log in as {DEMO_USER}/{DEMO_PASSWORD} to label and acknowledge)")
        return dashboard

    def _wait_until_up(self, log: Path, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"lineguard-ui exited; see {log}")
            try:
                with urllib.request.urlopen(f"{self.url}api/health", timeout=1) as answer:
                    json.load(answer)
                    return
            except OSError:
                time.sleep(0.1)
        sys.exit(f"lineguard-ui did not answer within {timeout_s:.0f} s; see {log}")

    def hold_open(self) -> None:
        """On a terminal, keep the page up until Ctrl-C so the run can be looked at; elsewhere return at once."""
        if not sys.stdin.isatty():
            return
        print(f"the dashboard stays up at {self.url}: press Ctrl-C to stop it")
        with contextlib.suppress(KeyboardInterrupt):
            self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=20)
