"""gpio: drive lines of a GPIO chip directly (libgpiod v2 through the `gpiod` package): Jetson, industrial PCs.

The lines are requested as outputs, inactive, for as long as the service runs. On Jetson (JetPack 6) a line
falls back to its default when the process holding it exits: wire de-energised = reject/fault. gpiod is
imported here only; a missing chip is OutputUnavailable naming gpio.chip (a configuration error, exit 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import ActuatorConfig
from .base import OutputFault, OutputUnavailable
from .pulse import PulseOutput, Signal

CONSUMER = "lineguard-actuator"


def _request_lines(chip: str, offsets: tuple[int, ...], *, active_low: bool) -> Any:
    """libgpiod v2: the lines as outputs, inactive; the returned request sets values and is released at close."""
    import gpiod
    from gpiod.line import Direction, Value

    settings = gpiod.LineSettings(direction=Direction.OUTPUT, output_value=Value.INACTIVE, active_low=active_low)
    return gpiod.request_lines(chip, consumer=CONSUMER, config={offsets: settings})


class GpioOutput(PulseOutput):
    kind = "gpio"

    def __init__(self, config: ActuatorConfig, *, request_lines: Callable[..., Any] | None = None) -> None:
        """request_lines: how lines are requested (tests pass a double; the kernel here has no GPIO at all)."""
        gpio = config.gpio
        self.lines: dict[Signal, int] = {"reject": gpio.reject_line}
        if gpio.ready_line >= 0:
            self.lines["ready"] = gpio.ready_line
        if gpio.run_line >= 0:
            self.lines["run"] = gpio.run_line
        super().__init__(config.pulse, signals=tuple(signal for signal in self.lines if signal != "reject"))
        if request_lines is None:
            try:
                import gpiod  # noqa: F401 - only to say clearly that it is missing
            except ImportError as error:
                msg = "output.kind gpio: the gpiod package (libgpiod v2) is not installed; pip install 'lineguard[actuator]'"
                raise OutputUnavailable(msg) from error
            request_lines = _request_lines
        try:
            self.request = request_lines(str(gpio.chip), tuple(self.lines.values()), active_low=gpio.active_low)
        except (OSError, ValueError) as error:
            msg = f"gpio.chip {gpio.chip}: cannot request lines {sorted(self.lines.values())}: {error}"
            raise OutputUnavailable(msg) from error

    def _drive(self, signal: Signal, on: bool) -> None:
        from gpiod.line import Value

        try:
            self.request.set_value(self.lines[signal], Value.ACTIVE if on else Value.INACTIVE)
        except OSError as error:
            msg = f"gpio {signal} line {self.lines[signal]}: {error}"
            raise OutputFault(msg) from error

    def close(self) -> None:
        super().close()
        self.request.release()
