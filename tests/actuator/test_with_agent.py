"""The whole chain: the real agent replays the sample test images through its model, the real actuator fires a
real Modbus coil; the pulses are compared with the verdicts the agent published, then the agent is SIGKILLed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from actuator_tools import ACTUATOR, READY_COIL, REJECT_COIL, TOPICS, statuses, stop, wait_state, wall_minus_monotonic
from mqtt_subscriber import Subscriber

from lineguard.agent.signing import public_key_path
from lineguard.trainer.scoring import load_split_scores

pytestmark = pytest.mark.slow
AGENT = f"agent-act-{os.getpid()}"  # its rings in /dev/shm are named after it
DELAY_MS = 2500.0  # the agent's deadline here is 1000 ms (a loaded CI box), plus MQTT and margin


def agent_config(tmp_path: Path, port: int, work: Path, key: Path, folder: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""agent_id = "{AGENT}"
line = "line-1"
run_dir = "{tmp_path / "run"}"
state_dir = "{tmp_path / "state"}"
[[cameras]]
name = "cam0"
source = "folder"
address = "{folder}"
fps = 8
[engine]
bundle = "{work / "bundle"}"
trusted_keys = ["{public_key_path(key)}"]
threads = 1
[decision]
deadline_ms = 1000
heatmap = "none"
[mqtt]
port = {port}
[metrics]
port = 0
"""
    )
    return path


def actuator_config(tmp_path: Path, port: int, modbus_port: int) -> Path:
    path = tmp_path / "actuator.toml"
    path.write_text(
        f"""actuator_id = "{ACTUATOR}"
line = "line-1"
reject_delay_ms = {DELAY_MS}
[[sources]]
agent = "{AGENT}"
cameras = ["cam0"]
[pulse]
width_ms = 30
min_off_ms = 10
late_limit_ms = 100
[fault]
action = "reject-all"
[modbus]
port = {modbus_port}
reject_coil = {REJECT_COIL}
ready_coil = {READY_COIL}
[startup]
status_timeout_s = 60
probes = 5
[mqtt]
port = {port}
[metrics]
port = 0
"""
    )
    return path


def test_the_real_agent_and_actuator_pulse_once_per_non_accepted_part_and_fault_when_the_agent_is_killed(
    broker, modbus_device, trained_work, signing_key, tmp_path, start_actuator
):
    folder = tmp_path / "replay"
    folder.mkdir()
    test = load_split_scores(trained_work / "scores" / "test.npz")
    for index, image in enumerate(test.paths):
        shutil.copyfile(image, folder / f"{index:03d}_{Path(image).parent.name}.png")
    frames = len(test.paths)
    verdicts_topic = TOPICS.verdict("line-1", AGENT, "cam0")
    subscriber = Subscriber(broker, "lineguard/#")
    agent = subprocess.Popen(
        [
            Path(sys.executable).with_name("lineguard-agent"),
            "run",
            "--config",
            str(agent_config(tmp_path, broker.port, trained_work, signing_key, folder)),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,  # its own process group: SIGKILL takes the supervisor and every worker
    )
    try:
        actuator = start_actuator(actuator_config(tmp_path, broker.port, modbus_device.port))
        wait_state(subscriber, "ok", timeout_s=90)
        assert subscriber.wait_until(lambda: len(subscriber.verdicts(verdicts_topic)) >= frames, 90)
        time.sleep(DELAY_MS / 1e3 + 0.5)
        verdicts = subscriber.verdicts(verdicts_topic)
        offset = wall_minus_monotonic()
        rejected = sorted(v.capture_ts + DELAY_MS / 1e3 - offset for v in verdicts if v.verdict != "accept")
        first_due = min(v.capture_ts for v in verdicts) + DELAY_MS / 1e3 - offset
        pulses = modbus_device.rising_edges(REJECT_COIL, after=first_due - 0.05)
        assert rejected, "the sample test split has defects: some parts must be rejected"
        assert len(pulses) == len(rejected), (len(pulses), len(rejected))
        errors = [pulse - due for pulse, due in zip(pulses, rejected, strict=True)]
        assert all(-0.002 <= error < 0.1 for error in errors), errors
        # The retained status is published periodically: wait for the one that counts the last part.
        assert subscriber.wait_until(lambda: statuses(subscriber)[-1].parts == frames, 10), statuses(subscriber)[-1]

        killed = time.monotonic()
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
        fault = wait_state(subscriber, "vision-fault", timeout_s=5)
        assert AGENT in fault.reason
        held = modbus_device.rising_edges(REJECT_COIL, after=killed)
        assert held and held[0] - killed < 2.0, "reject-all did not follow the agent's last will within 2 s"
        assert stop(actuator) == 0
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
        for ring in Path("/dev/shm").glob(f"lg-{AGENT}-*"):
            ring.unlink(missing_ok=True)
