"""modbus-plc: hand each result to a PLC as holding registers with a handshake word it echoes (Modbus TCP)."""

from __future__ import annotations

import logging

from ..config import ActuatorConfig
from .base import OutputFault
from .handshake import HandshakeOutput, Result
from .modbus import ModbusLink

log = logging.getLogger(__name__)


class ModbusPlcOutput(HandshakeOutput):
    kind = "modbus-plc"

    def __init__(self, config: ActuatorConfig) -> None:
        super().__init__(config)
        self.modbus = config.modbus
        self.link = ModbusLink(config.modbus)

    def _write_result(self, result: Result) -> None:
        words = (result.handshake, result.result, result.reason, result.part_id & 0xFFFF, result.part_id >> 16)
        self.link.write_registers(self.modbus.result_register, words)

    def _read_echo(self) -> int:
        return self.link.read_registers(self.modbus.echo_register, 1)[0]

    def _write_state(self, code: int) -> None:
        self.link.write_registers(self.modbus.state_register, [code])

    def close(self) -> None:
        try:
            self._write_state(0)  # 0: the vision system is gone
        except OutputFault as error:
            log.warning(
                "modbus-plc: could not write state 0 at close (the PLC's own watchdog must cover it): %s", error
            )
        self.link.close()
