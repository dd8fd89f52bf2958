"""Actuator test helpers: a stand-in agent that publishes through the contract, the actuator's config, and
reading its status (fixtures are in tests/actuator/conftest.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from broker import MosquittoBroker
from mqtt_subscriber import Subscriber
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from lineguard.actuator.iosim import ModbusDevice
from lineguard.agent.contract import ActuatorStatus, AgentStatus, Latency, Topics, Verdict

TOPICS = Topics("lineguard")
ACTUATOR = "gate-1"
AGENT = "press-3"
CAMERA = "top"
DELAY_MS = 400.0
REJECT_COIL, READY_COIL = 0, 1


class FakeAgent:
    """Publishes an agent's retained status and its verdicts exactly as the contract says (QoS 1)."""

    def __init__(self, broker: MosquittoBroker, agent: str = AGENT, *, deadline_ms: float = 100.0) -> None:
        self.agent, self.deadline_ms, self.seq = agent, deadline_ms, 0
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"fake-{agent}", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.sent: list[Verdict] = []
        self.status(online=True)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="fake-agent-status", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        """The status again every 2 s, as the real agent does (an agent silent for 6 s is offline)."""
        while not self._stop.wait(2.0):
            try:
                self.status(online=True)
            except RuntimeError:  # a test stopped the broker: the real agent, too, just tries again later
                continue

    def status(self, *, online: bool) -> None:
        record = AgentStatus(
            agent_id=self.agent, line="line-1", online=online, deadline_ms=self.deadline_ms, ts=time.time()
        )
        self.client.publish(TOPICS.status(self.agent), record.encode(), qos=1, retain=True).wait_for_publish(5)

    def verdict(self, kind: str, *, seq: int | None = None, camera: str = CAMERA, publish: bool = True) -> Verdict:
        """A verdict for a part captured now; seq defaults to the next one. publish=False drops it (a lost message)."""
        self.seq = self.seq + 1 if seq is None else seq
        now = time.time()
        record = Verdict(
            agent_id=self.agent,
            line="line-1",
            camera=camera,
            seq=self.seq,
            capture_ts=now,
            decided_ts=now + 0.005,
            verdict=kind,
            cause="engine-late" if kind == "failsafe" else None,
            reason="test",
            score=None,
            threshold=0.5,
            model="brick@1.0.0",
            latency_ms=Latency(total=5.0),
        )
        self.sent.append(record)
        if publish:
            self.raw(TOPICS.verdict("line-1", self.agent, camera), record.encode())
        return record

    def raw(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self._stop.set()
        self._beat.join(5)
        self.client.disconnect()
        self.client.loop_stop()


def write_config(
    tmp_path: Path,
    broker: MosquittoBroker,
    device: ModbusDevice | None,
    extra: str = "",
    *,
    kind: str = "modbus-coil",
    delay_ms: float = DELAY_MS,
    fault_action: str = "reject-all",
) -> Path:
    port = device.port if device is not None else 1
    path = tmp_path / "actuator.toml"
    path.write_text(
        f"""actuator_id = "{ACTUATOR}"
line = "line-1"
reject_delay_ms = {delay_ms}
margin_ms = 50

[[sources]]
agent = "{AGENT}"
cameras = ["{CAMERA}"]

[pulse]
width_ms = 30
min_off_ms = 10
late_limit_ms = 100

[fault]
action = "{fault_action}"
agent_silent_s = 6
hold_s = 1

[output]
kind = "{kind}"
handshake_timeout_ms = 100

[modbus]
port = {port}
reject_coil = {REJECT_COIL}
ready_coil = {READY_COIL}

[startup]
status_timeout_s = 10
probes = 5

[mqtt]
port = {broker.port}
keepalive_s = 2

[metrics]
port = 0
{extra}
"""
    )
    return path


def actuator_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("lineguard-actuator")), *args]


def stop(process: subprocess.Popen, timeout_s: float = 20) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=timeout_s)


def statuses(subscriber: Subscriber) -> list[ActuatorStatus]:
    return subscriber.records(TOPICS.actuator_status(ACTUATOR), ActuatorStatus)


def wait_state(subscriber: Subscriber, state: str, timeout_s: float = 30) -> ActuatorStatus:
    def reached() -> bool:
        found = statuses(subscriber)
        return bool(found) and found[-1].online and found[-1].state == state

    assert subscriber.wait_until(reached, timeout_s), f"actuator never reached {state}: {statuses(subscriber)[-3:]}"
    return statuses(subscriber)[-1]


def wall_minus_monotonic() -> float:
    return time.time() - time.monotonic()
