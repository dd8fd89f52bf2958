"""The dashboard under test: `lineguard-ui run` as a real process on a loopback port (UiServer), logging in
through its forms, and SIGKILLing an agent's whole process group. Fixtures are in tests/ui/conftest.py."""

from __future__ import annotations

import http.cookiejar
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("LINEGUARD_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "ui"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
PASSWORD = "correct horse battery"


@dataclass
class UiServer:
    """One `lineguard-ui run` process; `url` is its base URL, `state_dir` what survives a restart."""

    config_path: Path
    state_dir: Path
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    cookies: http.cookiejar.CookieJar = field(default_factory=http.cookiejar.CookieJar)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_for_broker: bool = True, timeout_s: float = 30.0) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [Path(sys.executable).with_name("lineguard-ui"), "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"lineguard-ui exited:\n{self.log_path.read_text()[-3000:]}"
            try:
                health = self.get("/api/health")
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
                continue
            if health["broker"]["connected"] or not wait_for_broker:
                return
            time.sleep(0.1)
        raise AssertionError(f"lineguard-ui did not come up:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> int:
        process, self.process = self.process, None
        if process is None:
            return 0
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=30)

    def request(
        self, path: str, *, data: Any = None, headers: dict[str, str] | None = None, method: str | None = None
    ) -> tuple[int, Any]:
        """(status, decoded JSON or text) of a request with this server's cookie jar; 4xx/5xx are returned, not raised."""
        body = None if data is None else (data if isinstance(data, bytes) else json.dumps(data).encode())
        all_headers = {"Content-Type": "application/json"} if isinstance(data, dict) else {}
        all_headers.update(headers or {})
        request = urllib.request.Request(self.url + path, data=body, headers=all_headers, method=method)
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))
        try:
            with opener.open(request, timeout=10) as response:
                status, raw, kind = response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            status, raw, kind = error.code, error.read(), error.headers.get("Content-Type", "")
        return status, json.loads(raw) if "json" in kind else raw.decode(errors="replace")

    def get(self, path: str) -> Any:
        status, body = self.request(path)
        assert status == 200, (path, status, body)
        return body


def kill_group(agent: subprocess.Popen[bytes]) -> None:
    """SIGKILL the agent and all its workers at once: no clean stop, the broker publishes the last will."""
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait(timeout=10)


def login(page: Any, server: UiServer, user: str = "anna", password: str = PASSWORD) -> None:
    page.goto(f"{server.url}/login")
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_selector(f".who .user:text-is('{user}')")


def http_login(server: UiServer, user: str = "anna", password: str = PASSWORD) -> str:
    """Log in through the form as a browser would; the session's CSRF token."""
    status, text = server.request("/login")
    assert status == 200
    token = text.split('name="csrf_token" value="')[1].split('"')[0]
    form = f"user={user}&password={password.replace(' ', '+')}&csrf_token={token}".encode()
    status, _ = server.request("/login", data=form, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200  # after the 303 back to the page
    return str(server.get("/api/line/line-1/snapshot")["viewer"]["csrf"])
