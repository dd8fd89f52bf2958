"""A simulated I/O block or PLC for the demo, the benchmark and the tests: a real pymodbus TCP server on
127.0.0.1 that records every write with time.monotonic() (not for production: it serves anyone who connects).

    block = ModbusDevice()                  # started; block.port
    block.coil_edges(0)                     # [(t, on), ...] of coil 0, in order
    block.echo = False                      # a PLC that stops echoing the handshake
    block.set_registers(100, [low, high])   # e.g. a line counter
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


WRITE_COIL, WRITE_COILS, WRITE_REGISTER, WRITE_REGISTERS = 5, 15, 6, 16


@dataclass(frozen=True)
class Write:
    t: float  # time.monotonic() when the server received it
    function: int
    address: int
    values: tuple[int, ...]


@dataclass
class ModbusDevice:
    """A Modbus TCP server on 127.0.0.1 (unit 1): 256 coils, 256 holding registers.

    As a PLC it copies the handshake word (result_register) to echo_register when `echo` is True."""

    result_register: int = 0
    echo_register: int = 10
    echo: bool = True
    writes: list[Write] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.port = free_port()
        self._lock = threading.Lock()
        self._registers: list[int] | None = None
        self._pending: dict[int, int] = {}
        device = SimDevice(
            1,
            simdata=(
                [SimData(0, count=256, values=False, datatype=DataType.BITS)],
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, count=256, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)],
            ),
            action=self._action,
        )
        self._loop = asyncio.new_event_loop()
        self._server: ModbusTcpServer | None = None
        self._thread = threading.Thread(target=self._run, args=(device,), name="modbus-device", daemon=True)
        self._thread.start()
        self._wait_listening()

    def _run(self, device: SimDevice) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            self._server = ModbusTcpServer(device, address=("127.0.0.1", self.port))
            await self._server.serve_forever()

        self._loop.run_until_complete(serve())

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        msg = f"the simulated Modbus device did not start on port {self.port}"
        raise RuntimeError(msg)

    async def _action(self, function: int, start: int, address: int, count: int, registers: list[int], values: Any):
        now = time.monotonic()
        if function in (3, 16) and self._registers is None:
            self._registers = registers
        with self._lock:
            if function in (3, 16):
                for index, value in self._pending.items():
                    registers[index - start] = value
                self._pending.clear()
            if values is None:
                return None
            self.writes.append(Write(now, function, address, tuple(int(v) for v in values)))
            if function == WRITE_REGISTERS and address == self.result_register and self.echo:
                registers[self.echo_register - start] = int(values[0])
        return None

    def set_registers(self, address: int, values: list[int]) -> None:
        """Set holding registers as the device's own logic would (seen by the next read)."""
        with self._lock:
            for offset, value in enumerate(values):
                self._pending[address + offset] = value

    def coil_edges(self, coil: int) -> list[tuple[float, bool]]:
        """Changes of one coil's state, in order (a rewrite of the same value is no edge)."""
        edges: list[tuple[float, bool]] = []
        with self._lock:
            writes = list(self.writes)
        for write in writes:
            if write.function == WRITE_COIL and write.address == coil:
                on = bool(write.values[0])
                if not edges or edges[-1][1] != on:
                    edges.append((write.t, on))
        return edges

    def rising_edges(self, coil: int, *, after: float = 0.0) -> list[float]:
        return [t for t, on in self.coil_edges(coil) if on and t > after]

    def register_writes(self, address: int) -> list[Write]:
        with self._lock:
            return [w for w in self.writes if w.function == WRITE_REGISTERS and w.address == address]

    def close(self) -> None:
        assert self._server is not None
        asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(5)
        self._thread.join(5)
