"""Agent fixtures: real Mosquitto brokers on loopback ports (see tests/broker.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import INSTALL_HINT, MosquittoBroker, find_program
from fake_camera import FakeCamera, require_fake_camera


@pytest.fixture(scope="session")
def mosquitto_installed() -> None:
    if find_program("mosquitto") is None:
        pytest.skip(f"mosquitto is not installed: {INSTALL_HINT}")


@pytest.fixture
def broker(mosquitto_installed: None, tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A plain broker (anonymous, no persistence) for one test."""
    with MosquittoBroker(tmp_path / "broker") as started:
        yield started


@pytest.fixture(scope="module")
def tls_broker(mosquitto_installed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A TLS-only broker that requires a client certificate; its CA and client files are in `.tls`."""
    with MosquittoBroker(tmp_path_factory.mktemp("tls-broker"), tls=True) as started:
        yield started


@pytest.fixture
def broker_factory(mosquitto_installed: None, tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """Build brokers with options (users=, persistence=, tls=); all are stopped after the test."""
    started: list[MosquittoBroker] = []

    def make(**options: Any) -> MosquittoBroker:
        new = MosquittoBroker(tmp_path / f"broker-{len(started)}", **options)
        started.append(new)
        return new

    yield make
    for each in started:
        each.close()


@pytest.fixture(scope="module")
def fake_camera(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCamera]:
    """A fresh arv-fake-gv-camera-0.8 on 127.0.0.1 for one test module (its state persists while it lives)."""
    require_fake_camera()
    camera = FakeCamera(tmp_path_factory.mktemp("fake-camera") / "fake-camera.log")
    camera.start()
    yield camera
    camera.kill()
