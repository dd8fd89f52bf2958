"""Actuator fixtures: a Modbus device on loopback, a stand-in agent, and `lineguard-actuator run` as a subprocess
(brokers are in tests/conftest.py; helpers in tests/actuator_tools.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from actuator_tools import FakeAgent, actuator_command
from broker import MosquittoBroker

from lineguard.actuator.iosim import ModbusDevice


@pytest.fixture
def modbus_device() -> Iterator[ModbusDevice]:
    device = ModbusDevice()
    yield device
    device.close()


@pytest.fixture
def fake_agent(broker: MosquittoBroker) -> Iterator[FakeAgent]:
    agent = FakeAgent(broker)
    yield agent
    agent.close()


@pytest.fixture
def start_actuator() -> Iterator[Callable[..., subprocess.Popen]]:
    started: list[subprocess.Popen] = []

    def start(config: Path, *, env: dict[str, str] | None = None) -> subprocess.Popen:
        process = subprocess.Popen(actuator_command("run", "--config", str(config)), env={**os.environ, **(env or {})})
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()
