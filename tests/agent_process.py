"""A `lineguard-agent run` process started as systemd would start it, so a test can wait for READY=1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class AgentProcess(subprocess.Popen):
    """`lineguard-agent run --config CONFIG` with a NOTIFY_SOCKET of its own."""

    def __init__(self, config: Path) -> None:
        self.notifications = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify_dir = Path(tempfile.mkdtemp(prefix="lg-notify-"))  # short: AF_UNIX paths are limited
        notify_path = self._notify_dir / "notify.sock"
        self.notifications.bind(str(notify_path))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NOTIFY_SOCKET": str(notify_path)}
        super().__init__([Path(sys.executable).with_name("lineguard-agent"), "run", "--config", str(config)], env=env)

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Until the supervisor says READY=1: every worker has come up once."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            assert self.poll() is None, f"the agent exited with {self.returncode} before it was ready"
            self.notifications.settimeout(min(left, 1.0))
            try:
                if self.notifications.recv(256) == b"READY=1":
                    return
            except TimeoutError:
                continue
        raise AssertionError(f"the agent did not say READY=1 within {timeout_s:.0f} s")

    def release(self) -> None:
        """Kill the agent if it still runs and remove its notify socket."""
        if self.poll() is None:
            self.kill()
            self.wait()
        self.notifications.close()
        shutil.rmtree(self._notify_dir, ignore_errors=True)
