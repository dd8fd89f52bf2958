"""modbus-coil: pulse a coil on a remote I/O block (Modbus TCP) per rejected part; ready and run coils held."""

from __future__ import annotations

from ..config import ActuatorConfig
from .modbus import ModbusLink
from .pulse import PulseOutput, Signal


class ModbusCoilOutput(PulseOutput):
    kind = "modbus-coil"

    def __init__(self, config: ActuatorConfig) -> None:
        modbus = config.modbus
        self.coils: dict[Signal, int] = {"reject": modbus.reject_coil}
        if modbus.ready_coil >= 0:
            self.coils["ready"] = modbus.ready_coil
        if modbus.run_coil >= 0:
            self.coils["run"] = modbus.run_coil
        super().__init__(config.pulse, signals=tuple(signal for signal in self.coils if signal != "reject"))
        self.link = ModbusLink(modbus)

    def _drive(self, signal: Signal, on: bool) -> None:
        self.link.write_coil(self.coils[signal], on)

    def close(self) -> None:
        super().close()
        self.link.close()
