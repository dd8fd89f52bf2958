"""Dashboard fixtures: `lineguard-ui run` as a real process on a loopback port, a real agent in its own process
group (so a test can SIGKILL all of it), and Debian's chromium driven by Playwright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import MosquittoBroker, free_port
from ui_server import CHROMIUM, CHROMIUM_ARGS, PASSWORD, UiServer

from lineguard.ui.auth import add_user


@pytest.fixture
def ui_factory(tmp_path: Path) -> Iterator[Callable[..., UiServer]]:
    """ui_factory(broker, label_key=None, users=True, **toml sections) -> a started UiServer; stopped after the test."""
    started: list[UiServer] = []

    def make(
        broker: MosquittoBroker,
        *,
        label_key: Path | None = None,
        users: bool = True,
        extra: str = "",
        start: bool = True,
    ) -> UiServer:
        folder = tmp_path / f"ui-{len(started)}"
        folder.mkdir()
        users_file = folder / "users"
        if users:
            add_user(users_file, "anna", PASSWORD)
        config = folder / "ui.toml"
        label = f'label_key = "{label_key}"\n' if label_key else ""
        auth = f'[auth]\nusers_file = "{users_file}"\n' if users else ""
        config.write_text(
            f'line = "line-1"\nstate_dir = "{folder / "state"}"\n{label}{extra}\n'
            f'[http]\nport = {free_port()}\n\n[mqtt]\nport = {broker.port}\nclient_id = "ui-{os.getpid()}-{len(started)}"\n\n'
            f"[alarms]\ncamera_silence_s = 5.0\n\n{auth}"
        )
        server = UiServer(
            config, folder / "state", int(config.read_text().split("port = ")[1].split()[0]), folder / "ui.log"
        )
        started.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in started:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's chromium through Playwright (it cannot download its own browsers here)."""
    if not CHROMIUM.exists():
        pytest.skip("apt-get install chromium (./run test installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1600, "height": 1200})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert errors == [], f"the page raised: {errors}"


@pytest.fixture
def start_agent_group() -> Iterator[Callable[[Path], subprocess.Popen[bytes]]]:
    """`lineguard-agent run` in a process group of its own: killpg(SIGKILL) takes every worker with it."""
    started: list[subprocess.Popen[bytes]] = []

    def start(config: Path) -> subprocess.Popen[bytes]:
        agent = subprocess.Popen(
            [Path(sys.executable).with_name("lineguard-agent"), "run", "--config", str(config)],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            start_new_session=True,
        )
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
