"""The Modbus TCP link shared by the coil and PLC back ends: one pymodbus client, connected on demand.

pymodbus is imported here only, when a Modbus back end is built: the other back ends do not need it.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from ..config import ModbusConfig
from .base import OutputFault, OutputUnavailable


class ModbusLink:
    """Writes and reads on one device; every failure is an OutputFault that names the device and the address."""

    def __init__(self, config: ModbusConfig) -> None:
        try:
            from pymodbus.client import ModbusTcpClient
            from pymodbus.exceptions import ModbusException
        except ImportError as error:
            msg = "output.kind modbus-*: pymodbus is not installed; pip install 'lineguard[actuator]'"
            raise OutputUnavailable(msg) from error
        self._errors: tuple[type[Exception], ...] = (ModbusException, OSError)
        self.where = f"modbus://{config.host}:{config.port} unit {config.device_id}"
        self.device_id = config.device_id
        # retries=0: a lost answer is a fault now, not three timeouts later; the caller retries on its schedule.
        self.client = ModbusTcpClient(config.host, port=config.port, timeout=config.timeout_s, retries=0)

    def _call(self, what: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.client.connected:
            if not self.client.connect():
                msg = f"{self.where}: cannot connect (is the I/O block or PLC on, and modbus.host/port right?)"
                raise OutputFault(msg)
            # Requests are tiny: without TCP_NODELAY, Nagle and delayed ACKs can hold one back for 40 ms.
            if self.client.socket is not None:
                self.client.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            result = method(*args, device_id=self.device_id, **kwargs)
        except self._errors as error:
            self.client.close()
            msg = f"{self.where}: {what} failed: {error}"
            raise OutputFault(msg) from error
        if result.isError():
            msg = f"{self.where}: {what} refused: {result}"
            raise OutputFault(msg)
        return result

    def write_coil(self, address: int, on: bool) -> None:
        self._call(f"write coil {address}={int(on)}", self.client.write_coil, address, on)

    def write_registers(self, address: int, values: Sequence[int]) -> None:
        self._call(
            f"write registers {address}..{address + len(values) - 1}",
            self.client.write_registers,
            address,
            list(values),
        )

    def read_registers(self, address: int, count: int) -> list[int]:
        result = self._call(
            f"read registers {address}..{address + count - 1}", self.client.read_holding_registers, address, count=count
        )
        return list(result.registers)

    def close(self) -> None:
        self.client.close()
