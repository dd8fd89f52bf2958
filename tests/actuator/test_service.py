"""`lineguard-actuator run` against a real Mosquitto and a real Modbus TCP server on loopback, fed by a stand-in
agent that publishes contract records: pulses, default rejects, duplicates, bad input and the fault action."""

from __future__ import annotations

import time

import pytest
from actuator_tools import (
    ACTUATOR,
    DELAY_MS,
    READY_COIL,
    REJECT_COIL,
    TOPICS,
    FakeAgent,
    statuses,
    stop,
    wait_state,
    wall_minus_monotonic,
    write_config,
)
from mqtt_subscriber import Subscriber

pytestmark = pytest.mark.slow
# Pulse start vs due point, as the Modbus server (in this test process, sharing 2 cores) records it: the median
# within 10 ms and none past 100 ms, the tests' pulse.late_limit_ms (README "Timing"; bench/actuator_bench.py
# measures it without the test's load).
MEDIAN_TOLERANCE_S, MAX_TOLERANCE_S = 0.010, 0.1
SPACING_S = 0.06  # parts 60 ms apart: more than a 30 ms pulse + 10 ms off, so no two merge


def run_stream(agent: FakeAgent, kinds: list[str], *, drop: frozenset[int] = frozenset()) -> list:
    sent = []
    for index, kind in enumerate(kinds):
        sent.append(agent.verdict(kind, publish=index not in drop))
        time.sleep(SPACING_S)
    time.sleep(DELAY_MS / 1e3 + 0.3)
    return sent


def due_monotonic(verdict) -> float:
    return verdict.capture_ts + DELAY_MS / 1e3 - wall_minus_monotonic()


def assert_one_pulse_per_reject(device, sent, rejected, after):
    pulses = device.rising_edges(REJECT_COIL, after=after)
    dues = [due_monotonic(v) for v in sent if v.seq in rejected]
    assert len(pulses) == len(dues), (len(pulses), sorted(rejected))
    errors = [pulse - due for pulse, due in zip(pulses, dues, strict=True)]
    assert all(-0.002 <= error <= MAX_TOLERANCE_S for error in errors), errors
    if len(errors) >= 5:  # a median of one or two pulses says nothing but how busy the machine was then
        assert sorted(errors)[len(errors) // 2] <= MEDIAN_TOLERANCE_S, errors


def test_one_pulse_per_rejected_or_failsafe_part_at_its_due_point_and_none_for_accepts(
    broker, modbus_device, fake_agent, tmp_path, start_actuator
):
    subscriber = Subscriber(broker, TOPICS.actuator_status(ACTUATOR))
    actuator = start_actuator(write_config(tmp_path, broker, modbus_device))
    wait_state(subscriber, "ok")
    start = time.monotonic()
    kinds = ["accept", "reject", "accept", "failsafe", "accept", "accept", "reject", "reject", "accept", "failsafe"]
    sent = run_stream(fake_agent, kinds * 2)
    assert_one_pulse_per_reject(modbus_device, sent, {v.seq for v in sent if v.verdict != "accept"}, start)
    assert modbus_device.coil_edges(READY_COIL)[-1][1] is True  # healthy: ready held on
    assert stop(actuator) == 0
    final = statuses(subscriber)[-1]
    assert final.online is False and final.state == "stopped"
    assert final.parts == 20 and final.pulses == 10 and final.rejects == {"reject": 6, "failsafe": 4}
    assert final.late_pulses == 0 and final.unguarded == 0
    assert modbus_device.coil_edges(READY_COIL)[-1][1] is False  # stopped: ready dropped (wire de-energised)


def test_a_dropped_verdict_is_a_default_reject_at_its_due_point(
    broker, modbus_device, fake_agent, tmp_path, start_actuator
):
    subscriber = Subscriber(broker, TOPICS.actuator_status(ACTUATOR))
    actuator = start_actuator(write_config(tmp_path, broker, modbus_device))
    wait_state(subscriber, "ok")
    start = time.monotonic()
    sent = run_stream(fake_agent, ["accept"] * 10, drop=frozenset({3, 7}))
    assert_one_pulse_per_reject(modbus_device, sent, {sent[3].seq, sent[7].seq}, start)
    assert stop(actuator) == 0
    final = statuses(subscriber)[-1]
    assert final.rejects == {"missing": 2} and final.parts == 10


def test_qos1_duplicates_bad_input_and_retained_verdicts_are_counted_and_never_fire_or_cancel(
    broker, modbus_device, fake_agent, tmp_path, start_actuator
):
    subscriber = Subscriber(broker, TOPICS.actuator_status(ACTUATOR))
    actuator = start_actuator(write_config(tmp_path, broker, modbus_device))
    wait_state(subscriber, "ok")
    start = time.monotonic()
    verdicts = TOPICS.verdict("line-1", fake_agent.agent, "top")
    rejected = fake_agent.verdict("reject")
    fake_agent.raw(verdicts, rejected.encode())  # a redelivery
    fake_agent.raw(verdicts, rejected.model_copy(update={"verdict": "accept", "reason": "forged"}).encode())
    for bad in (b"not json", b'{"v": 1}', b"\xff" * 10):
        fake_agent.raw(verdicts, bad)
    fake_agent.raw(
        TOPICS.verdict("line-1", fake_agent.agent, "side"),
        fake_agent.verdict("reject", seq=1, camera="side", publish=False).encode(),
    )
    fake_agent.raw(TOPICS.verdict("line-1", "stranger", "top"), rejected.encode())
    time.sleep(0.05)
    accepted = fake_agent.verdict("accept")
    fake_agent.raw(verdicts, accepted.encode(), retain=True)
    time.sleep(DELAY_MS / 1e3 + 0.3)
    assert_one_pulse_per_reject(modbus_device, [rejected, accepted], {rejected.seq}, start)
    fake_agent.raw(verdicts, b"", retain=True)  # clear the retained message
    assert actuator.poll() is None
    assert stop(actuator) == 0
    final = statuses(subscriber)[-1]
    # duplicate x2, three malformed, a camera and an agent not served here, a mismatch (side), a retained one
    assert final.bad_input >= 8 and final.pulses == 1 and final.parts == 2


def test_the_agents_last_will_brings_the_fault_action_within_a_second(broker, modbus_device, tmp_path, start_actuator):
    import os
    import signal
    import subprocess
    import sys

    subscriber = Subscriber(broker, TOPICS.actuator_status(ACTUATOR))
    # A real client with a last will, killed with SIGKILL: the broker publishes the will (online false).
    will_script = f"""
import sys, time
sys.path.insert(0, {str(os.path.dirname(__file__))!r}); sys.path.insert(0, {str(os.path.dirname(os.path.dirname(__file__)))!r})
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from lineguard.agent.contract import AgentStatus, Topics
topic = Topics("lineguard").status("press-3")
client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="press-3", protocol=MQTTProtocolVersion.MQTTv5)
client.will_set(topic, AgentStatus(agent_id="press-3", line="line-1", online=False, reason="connection lost", ts=time.time()).encode(), qos=1, retain=True)
client.connect("127.0.0.1", {broker.port})
client.loop_start()
while True:
    client.publish(topic, AgentStatus(agent_id="press-3", line="line-1", online=True, deadline_ms=100, ts=time.time()).encode(), qos=1, retain=True)
    time.sleep(1)
"""
    agent = subprocess.Popen([sys.executable, "-c", will_script])
    try:
        actuator = start_actuator(write_config(tmp_path, broker, modbus_device))
        wait_state(subscriber, "ok")
        killed = time.monotonic()
        os.kill(agent.pid, signal.SIGKILL)
        fault = wait_state(subscriber, "vision-fault", timeout_s=5)
        assert "press-3" in fault.reason and fault.agents == {"press-3": False}
        reject_on = modbus_device.rising_edges(REJECT_COIL, after=killed)
        ready_off = [t for t, on in modbus_device.coil_edges(READY_COIL) if not on and t > killed]
        assert reject_on and reject_on[0] - killed < 1.0, "reject-all did not hold the reject output on"
        assert ready_off and ready_off[0] - killed < 1.0, "the ready output did not drop"
        assert stop(actuator) == 0
    finally:
        agent.kill()
        agent.wait()


def test_a_lost_broker_is_a_vision_fault_and_known_rejects_still_fire(
    broker, modbus_device, fake_agent, tmp_path, start_actuator
):
    subscriber = Subscriber(broker, TOPICS.actuator_status(ACTUATOR))
    actuator = start_actuator(write_config(tmp_path, broker, modbus_device, fault_action="fault-output"))
    wait_state(subscriber, "ok")
    start = time.monotonic()
    rejected = fake_agent.verdict("reject")
    time.sleep(0.05)
    stopped = time.monotonic()
    broker.stop()
    time.sleep(DELAY_MS / 1e3 + 0.6)
    edges = [t for t, on in modbus_device.coil_edges(REJECT_COIL) if on and t > start]
    assert edges and -0.002 <= edges[0] - due_monotonic(rejected) < MAX_TOLERANCE_S  # the known reject fired on time
    ready = [(t, on) for t, on in modbus_device.coil_edges(READY_COIL) if t > stopped]
    assert ready and ready[0][1] is False and ready[0][0] - stopped < 3.0  # paho notices within ~1.5 keepalives
    assert len(edges) == 1 and modbus_device.coil_edges(REJECT_COIL)[-1][1] is False  # fault-output: no hold
    broker.start()
    assert actuator.poll() is None
    assert stop(actuator) == 0


def test_under_systemd_the_actuator_reports_ready_pings_the_watchdog_and_says_stopping(
    broker, modbus_device, fake_agent, tmp_path, start_actuator
):
    import socket

    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(1.0)
    env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
    actuator = start_actuator(write_config(tmp_path, broker, modbus_device), env=env)
    states: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while states.count("WATCHDOG=1") < 2 and time.monotonic() < deadline:
            try:
                states.append(listener.recv(256).decode())
            except TimeoutError:
                continue
        assert stop(actuator) == 0
        listener.settimeout(5.0)
        while states[-1] != "STOPPING=1":
            states.append(listener.recv(256).decode())
    finally:
        listener.close()
    assert states[0] == "READY=1" and states.count("WATCHDOG=1") >= 2, states
