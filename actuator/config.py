"""ActuatorConfig: one pydantic-settings schema, from a TOML file plus LINEGUARD_ACTUATOR_ environment overrides.

Precedence: environment (LINEGUARD_ACTUATOR_MODBUS__HOST=10.0.0.5) > TOML file > defaults. Validators do no
I/O: the broker, the agents' deadlines and the output device are checked at start-up (actuator/startup.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from lineguard.agent.config import ConfigError, MetricsConfig, MqttConfig, TomlSettings, _Section, load_settings

NAME = r"^[A-Za-z0-9_-]{1,64}$"
OutputKind = Literal["modbus-coil", "modbus-plc", "opcua", "gpio"]
FaultAction = Literal["fault-output", "reject-all", "line-stop"]

__all__ = ["ActuatorConfig", "ConfigError", "FaultAction", "OutputKind", "load_config"]


class SourceConfig(_Section):
    agent: str = Field(pattern=NAME, description="Agent id whose verdicts this gate acts on.")
    cameras: tuple[str, ...] = Field(
        min_length=1, description="That agent's cameras whose parts pass this gate (their verdicts' camera names)."
    )
    models: tuple[str, ...] = Field(
        (),
        description="Models whose accept is trusted, as `id` (any version) or `id@version`; empty = any model. "
        "A verdict from another model is a reject (unknown-model).",
    )


class PulseConfig(_Section):
    width_ms: float = Field(40.0, gt=0, le=10_000, description="How long the reject output stays on per part.")
    min_off_ms: float = Field(
        20.0, ge=0, le=10_000, description="Shortest off time between pulses; closer pulses merge into one."
    )
    late_limit_ms: float = Field(
        10.0,
        ge=0,
        le=1_000,
        description="A pulse that cannot start within this long after its due point is not fired (it would miss "
        "the part): it is counted as late and the alarm is raised.",
    )


class CountConfig(_Section):
    distance_counts: int = Field(
        1000, ge=1, description="Count mode: counter steps from the camera to the reject point."
    )
    max_counts_per_s: float = Field(
        2000.0, gt=0, description="Count mode: the counter's rate at the line's top speed (for the start-up check)."
    )
    poll_ms: float = Field(2.0, gt=0, le=100, description="Count mode: how often the counter is read.")
    counter_register: int = Field(
        0, ge=0, le=65534, description="Count mode: holding register of the 32-bit counter (low word first)."
    )


class FaultConfig(_Section):
    action: FaultAction = Field(
        "reject-all",
        description="On a vision fault: fault-output (drop the ready output only), reject-all (also hold the "
        "reject output on), line-stop (also drop the run-permit output).",
    )
    agent_silent_s: float = Field(
        6.0, gt=0, description="An agent with no status for this long is offline (it publishes one every 2 s)."
    )
    hold_s: float = Field(
        5.0, ge=0, description="After a part could not be guarded (unguarded, late pulse), the fault holds this long."
    )


class ModbusConfig(_Section):
    host: str = Field("127.0.0.1", description="I/O block or PLC address.")
    port: int = Field(502, ge=1, le=65535, description="Modbus TCP port.")
    device_id: int = Field(1, ge=0, le=255, description="Modbus unit (device) id.")
    timeout_s: float = Field(0.25, gt=0, le=10, description="Longest wait for one Modbus answer.")
    reject_coil: int = Field(0, ge=0, le=65535, description="modbus-coil: coil pulsed per rejected part.")
    ready_coil: int = Field(
        -1, ge=-1, le=65535, description="modbus-coil: coil held on while healthy (off = vision fault); -1 = none."
    )
    run_coil: int = Field(
        -1, ge=-1, le=65535, description="modbus-coil: run-permit coil, dropped by fault.action line-stop; -1 = none."
    )
    result_register: int = Field(
        0,
        ge=0,
        le=65530,
        description="modbus-plc: first of 5 holding registers: handshake, result (1 pass, 2 reject), reason, "
        "part id low word, part id high word.",
    )
    echo_register: int = Field(10, ge=0, le=65535, description="modbus-plc: where the PLC echoes the handshake word.")
    state_register: int = Field(
        11, ge=0, le=65535, description="modbus-plc: vision state (1 ok, 2 fault, 3 fault + reject all, 4 line stop)."
    )


class OpcUaConfig(_Section):
    endpoint: str = Field("opc.tcp://127.0.0.1:4840", description="The PLC's OPC UA server.")
    timeout_s: float = Field(1.0, gt=0, le=30, description="Longest wait for one OPC UA request.")
    handshake_node: str = Field("ns=2;s=Vision.Handshake", description="Node written with the toggling handshake.")
    result_node: str = Field("ns=2;s=Vision.Result", description="Node written with the result (1 pass, 2 reject).")
    reason_node: str = Field("ns=2;s=Vision.Reason", description="Node written with the reject reason code.")
    part_node: str = Field("ns=2;s=Vision.PartId", description="Node written with the part id (sequence number).")
    echo_node: str = Field("ns=2;s=Vision.Echo", description="Node where the PLC echoes the handshake.")
    state_node: str = Field("ns=2;s=Vision.State", description="Node written with the vision state (as modbus).")
    method_node: str = Field(
        "",
        description="If set, each result is a call of this method (on its parent object) with (result Int16, reason "
        "Int16, part id UInt32, handshake UInt16) instead of writes to the result nodes; the echo is read as before.",
    )


class GpioConfig(_Section):
    chip: Path = Field(Path("/dev/gpiochip0"), description="GPIO chip device.")
    reject_line: int = Field(0, ge=0, description="Line offset pulsed per rejected part.")
    ready_line: int = Field(-1, ge=-1, description="Line held active while healthy; -1 = none.")
    run_line: int = Field(-1, ge=-1, description="Run-permit line, dropped by fault.action line-stop; -1 = none.")
    active_low: bool = Field(False, description="Lines are active low (energised at 0 V).")


class OutputConfig(_Section):
    kind: OutputKind = Field(
        "modbus-coil",
        description="modbus-coil (pulse a coil on an I/O block), modbus-plc (result registers + handshake), "
        "opcua (result nodes + handshake), gpio (drive a line).",
    )
    handshake_timeout_ms: float = Field(
        200.0, gt=0, description="modbus-plc, opcua: the PLC must echo the handshake within this long."
    )


class StartupConfig(_Section):
    status_timeout_s: float = Field(
        15.0, gt=0, description="Wait this long for each agent's retained status (its deadline_ms)."
    )
    probes: int = Field(20, ge=1, le=1000, description="MQTT round trips measured at start-up; the slowest counts.")


class ActuatorConfig(TomlSettings):
    """The reject actuator's whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix="LINEGUARD_ACTUATOR_", env_nested_delimiter="__", extra="forbid", frozen=True, toml_file=None
    )

    actuator_id: str = Field("gate-1", pattern=NAME, description="This actuator's id in topics and status.")
    line: str = Field("line-1", pattern=NAME, description="Production line name (the agents' `line`).")
    mode: Literal["time", "count"] = Field(
        "time",
        description="time: due = capture time + reject_delay_ms (constant-speed conveyor); count: due when the "
        "counter has moved count.distance_counts since capture (variable speed).",
    )
    reject_delay_ms: float = Field(1500.0, gt=0, description="Time mode: capture to reject point.")
    margin_ms: float = Field(
        50.0, ge=0, description="Start-up check: reject_delay_ms >= agent deadline + MQTT latency + this."
    )
    sources: tuple[SourceConfig, ...] = Field(min_length=1, description="The agents and cameras this gate serves.")
    pulse: PulseConfig = Field(default_factory=PulseConfig)
    count: CountConfig = Field(default_factory=CountConfig)
    fault: FaultConfig = Field(default_factory=FaultConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    modbus: ModbusConfig = Field(default_factory=ModbusConfig)
    opcua: OpcUaConfig = Field(default_factory=OpcUaConfig)
    gpio: GpioConfig = Field(default_factory=GpioConfig)
    startup: StartupConfig = Field(default_factory=StartupConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    metrics: MetricsConfig = Field(default_factory=lambda: MetricsConfig(port=9109))

    @model_validator(mode="after")
    def _consistent(self) -> ActuatorConfig:
        agents = [source.agent for source in self.sources]
        if len(set(agents)) != len(agents):
            msg = f"sources: each agent once, got {agents}"
            raise ValueError(msg)
        if self.fault.action == "line-stop":
            run = self.gpio.run_line if self.output.kind == "gpio" else self.modbus.run_coil
            if self.output.kind in ("modbus-coil", "gpio") and run < 0:
                key = "gpio.run_line" if self.output.kind == "gpio" else "modbus.run_coil"
                msg = f"fault.action line-stop needs {key}: the output that permits the line to run"
                raise ValueError(msg)
        return self


def load_config(path: Path | None) -> ActuatorConfig:
    """Read and validate the configuration; ConfigError lists every problem as `key.path: message`."""
    return load_settings(ActuatorConfig, path, file_name="actuator.toml")
