"""Output back ends behind one interface (base.Output), chosen by `output.kind` from an explicit table.

Each back end's module is imported only when chosen, so a box without pymodbus, asyncua or gpiod runs the
others. No subclass discovery: a new back end is one module and one row here.
"""

from __future__ import annotations

import importlib

from ..config import ActuatorConfig, OutputKind
from .base import Output, OutputEvent, OutputFault, OutputUnavailable, PartRef

BACKENDS: dict[OutputKind, tuple[str, str]] = {
    "modbus-coil": ("modbus_coil", "ModbusCoilOutput"),
    "modbus-plc": ("modbus_plc", "ModbusPlcOutput"),
    "opcua": ("opcua", "OpcUaOutput"),
    "gpio": ("gpio", "GpioOutput"),
}


def make_output(config: ActuatorConfig) -> Output:
    """The configured back end; OutputUnavailable where it cannot exist here (library or device missing)."""
    module, name = BACKENDS[config.output.kind]
    output_type: type[Output] = getattr(importlib.import_module(f".{module}", __package__), name)
    return output_type(config)  # type: ignore[call-arg]


__all__ = ["BACKENDS", "Output", "OutputEvent", "OutputFault", "OutputUnavailable", "PartRef", "make_output"]
