"""The other back ends: a PLC over Modbus (registers + handshake, echoed or withheld), OPC UA against a real
asyncua server, GPIO through a line-object double (this kernel has no GPIO), and count mode."""

from __future__ import annotations

import time

import pytest
from actuator_tools import ACTUATOR, DELAY_MS, TOPICS, FakeAgent, statuses, stop, wait_state, write_config
from mqtt_subscriber import Subscriber

from lineguard.actuator.config import ActuatorConfig
from lineguard.actuator.outputs.base import PartRef

pytestmark = pytest.mark.slow
RESULT, ECHO, STATE = 0, 10, 11


def stream(agent: FakeAgent, kinds: list[str]) -> list:
    sent = []
    for kind in kinds:
        sent.append(agent.verdict(kind))
        time.sleep(0.06)
    time.sleep(DELAY_MS / 1e3 + 0.4)
    return sent


def test_a_plc_gets_every_result_with_a_new_handshake_word_and_echoes_it(
    broker, modbus_device, fake_agent, tmp_path, start_actuator
):
    subscriber = Subscriber(broker, TOPICS.actuator_status(ACTUATOR))
    actuator = start_actuator(write_config(tmp_path, broker, modbus_device, kind="modbus-plc"))
    wait_state(subscriber, "ok")
    sent = stream(fake_agent, ["accept", "reject", "failsafe", "accept"])
    writes = modbus_device.register_writes(RESULT)
    assert [w.values[1:] for w in writes] == [(1, 0, 1, 0), (2, 1, 2, 0), (2, 2, 3, 0), (1, 0, 4, 0)]
    words = [w.values[0] for w in writes]
    assert len(set(words)) == 4 and 0 not in words
    assert [w.values[0] for w in modbus_device.register_writes(STATE)][-1] == 1  # vision ok
    assert stop(actuator) == 0
    final = statuses(subscriber)[-1]
    assert final.handshake_failures == 0 and final.pulses == 2 and final.parts == len(sent)
    assert modbus_device.register_writes(STATE)[-1].values == (0,)  # stopped: the PLC sees state 0


def test_a_plc_that_does_not_echo_in_time_raises_an_alarm_and_counts_the_failure(
    broker, modbus_device, fake_agent, tmp_path, start_actuator
):
    modbus_device.echo = False
    subscriber = Subscriber(broker, TOPICS.actuator_status(ACTUATOR))
    actuator = start_actuator(write_config(tmp_path, broker, modbus_device, kind="modbus-plc"))
    wait_state(subscriber, "ok")
    stream(fake_agent, ["reject"])
    fault = wait_state(subscriber, "output-fault", timeout_s=5)
    assert "did not echo handshake" in fault.reason
    assert stop(actuator) == 0
    assert statuses(subscriber)[-1].handshake_failures == 1


@pytest.fixture
def opcua_server():
    asyncua = pytest.importorskip("asyncua")
    from asyncua import ua
    from asyncua.sync import Server
    from broker import free_port

    server = Server()
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/"
    server.set_endpoint(endpoint)
    vision = server.nodes.objects.add_object(ua.NodeId("Vision", 2), "Vision")
    types = {
        "Handshake": "UInt16",
        "Result": "Int16",
        "Reason": "Int16",
        "PartId": "UInt32",
        "Echo": "UInt16",
        "State": "Int16",
    }
    nodes = {}
    for name, kind in types.items():
        node = vision.add_variable(ua.NodeId(f"Vision.{name}", 2), name, ua.Variant(0, getattr(ua.VariantType, kind)))
        node.set_writable()
        nodes[name] = node

    def report(parent, result, reason, part, handshake):
        # A PLC taking the result as one method call: it stores the values and echoes the handshake.
        for name, value in (("Result", result), ("Reason", reason), ("PartId", part), ("Handshake", handshake)):
            nodes[name].write_value(value)
        nodes["Echo"].write_value(handshake)
        return []

    arguments = [ua.VariantType.Int16, ua.VariantType.Int16, ua.VariantType.UInt32, ua.VariantType.UInt16]
    vision.add_method(ua.NodeId("Vision.Report", 2), "Report", report, arguments, [])
    server.start()
    assert asyncua is not None
    yield endpoint, nodes
    server.stop()


def test_opcua_results_reach_the_plcs_nodes_and_a_missing_echo_is_a_handshake_failure(
    broker, opcua_server, fake_agent, tmp_path, start_actuator
):
    endpoint, nodes = opcua_server
    subscriber = Subscriber(broker, TOPICS.actuator_status(ACTUATOR))
    config = write_config(tmp_path, broker, None, f'[opcua]\nendpoint = "{endpoint}"\n', kind="opcua")
    actuator = start_actuator(config)
    wait_state(subscriber, "ok", timeout_s=40)
    rejected = fake_agent.verdict("reject")
    time.sleep(DELAY_MS / 1e3 + 0.05)
    assert (nodes["Result"].read_value(), nodes["PartId"].read_value(), nodes["Reason"].read_value()) == (
        2,
        rejected.seq,
        1,
    )
    assert nodes["Handshake"].read_value() != 0 and nodes["State"].read_value() == 1
    fault = wait_state(subscriber, "output-fault", timeout_s=5)  # nobody echoes on this server
    assert "did not echo handshake" in fault.reason
    assert stop(actuator) == 0
    assert nodes["State"].read_value() == 0


def test_opcua_method_calls_carry_each_result_and_the_plcs_echo_keeps_the_gate_ok(
    broker, opcua_server, fake_agent, tmp_path, start_actuator
):
    endpoint, nodes = opcua_server
    subscriber = Subscriber(broker, TOPICS.actuator_status(ACTUATOR))
    extra = f'[opcua]\nendpoint = "{endpoint}"\nmethod_node = "ns=2;s=Vision.Report"\n'
    config = write_config(tmp_path, broker, None, extra, kind="opcua")
    actuator = start_actuator(config)
    wait_state(subscriber, "ok", timeout_s=40)
    for kind, code in (("reject", 2), ("accept", 1), ("reject", 2)):
        sent = fake_agent.verdict(kind)
        time.sleep(DELAY_MS / 1e3 + 0.1)
        assert (nodes["Result"].read_value(), nodes["PartId"].read_value()) == (code, sent.seq)
        assert nodes["Echo"].read_value() == nodes["Handshake"].read_value() != 0
    time.sleep(0.5)  # a missing echo would show within handshake_timeout_ms (200 ms)
    assert stop(actuator) == 0
    last = statuses(subscriber)[-1]
    assert last.handshake_failures == 0 and last.state != "output-fault", last


class LineRequestDouble:
    """What gpiod.request_lines returns: set_value(offset, Value) and release(); records every call."""

    def __init__(self) -> None:
        self.values: list[tuple[float, int, bool]] = []
        self.released = False

    def set_value(self, offset: int, value) -> None:
        from gpiod.line import Value

        self.values.append((time.monotonic(), offset, value == Value.ACTIVE))

    def release(self) -> None:
        self.released = True


def test_gpio_drives_its_lines_through_libgpiod_requests():
    pytest.importorskip("gpiod")
    from lineguard.actuator.outputs.gpio import GpioOutput

    config = ActuatorConfig(
        sources=[{"agent": "press-3", "cameras": ["top"]}],
        output={"kind": "gpio"},
        gpio={"reject_line": 17, "ready_line": 27},
        pulse={"width_ms": 30, "min_off_ms": 10, "late_limit_ms": 10},
    )
    requests = []

    def request_lines(chip: str, offsets: tuple[int, ...], *, active_low: bool) -> LineRequestDouble:
        requests.append((chip, offsets, active_low))
        return LineRequestDouble()

    output = GpioOutput(config, request_lines=request_lines)
    assert requests == [("/dev/gpiochip0", (17, 27), False)]
    start = time.monotonic()
    output.set_fault(None, start)
    output.reject(PartRef(("press-3", "top", 1), "reject", start + 0.05), start)
    while time.monotonic() < start + 0.15:
        output.poll(time.monotonic())
        time.sleep(0.001)
    output.close()
    line = output.request
    edges = [(t - start, on) for t, offset, on in line.values if offset == 17]
    assert [on for _, on in edges][-3:] == [True, False, False]
    on_at = next(t for t, on in edges if on)
    assert 0.05 <= on_at < 0.06
    assert (27, True) in [(offset, on) for _, offset, on in line.values] and line.released
    assert [on for _, offset, on in line.values if offset == 27][-1] is False  # closed: ready dropped


def test_count_mode_fires_when_the_line_counter_reaches_the_reject_point(
    broker, modbus_device, fake_agent, tmp_path, start_actuator
):
    """A conveyor at 1000 counts/s; the reject point 400 counts downstream: the pulse follows the counter."""
    subscriber = Subscriber(broker, TOPICS.actuator_status(ACTUATOR))
    config = write_config(tmp_path, broker, modbus_device)
    text = config.read_text().replace('line = "line-1"\n', 'line = "line-1"\nmode = "count"\n')
    text += "[count]\ndistance_counts = 400\nmax_counts_per_s = 2000\ncounter_register = 100\npoll_ms = 2\n"
    config.write_text(text)
    counts = {"value": 0}
    modbus_device.set_registers(100, [0, 0])
    actuator = start_actuator(config)
    wait_state(subscriber, "ok")

    def advance(seconds: float, rate: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            counts["value"] += rate * 0.005
            value = int(counts["value"])
            modbus_device.set_registers(100, [value & 0xFFFF, value >> 16])
            time.sleep(0.005)

    advance(0.2, 1000)
    rejected = fake_agent.verdict("reject")
    at_capture = counts["value"]
    advance(0.2, 1000)  # 200 counts: not there yet
    assert modbus_device.rising_edges(0, after=time.monotonic() - 0.2) == []
    advance(0.1, 0)  # the line stops: nothing fires
    assert modbus_device.rising_edges(0, after=time.monotonic() - 0.1) == []
    advance(0.4, 1000)  # moves again: due after 400 counts in all
    edges = modbus_device.rising_edges(0, after=time.monotonic() - 0.4)
    assert len(edges) == 1, (edges, at_capture, rejected.seq)
    assert stop(actuator) == 0
    assert statuses(subscriber)[-1].rejects == {"reject": 1}
