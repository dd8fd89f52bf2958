"""Demo, the line side: a simulated I/O block (a real Modbus TCP server) and `lineguard-actuator` with a coil output,
printing one line per reject pulse next to the agent's verdict lines. Used by scripts/demo_agent.py.

Each line names the coil, the part it rejected (matched by due point among the verdicts on the broker), the part's
due point (capture time + reject delay) and how far after it the coil went on, as the I/O block saw it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from types import TracebackType

from lineguard.actuator.iosim import ModbusDevice
from lineguard.agent.config import MqttConfig
from lineguard.agent.contract import ContractError, Topics, Verdict, decode
from lineguard.agent.mqtt import Subscription

REJECT_COIL, READY_COIL = 0, 1
DELAY_MS = 1000.0  # camera to gate; the agent's deadline (250 ms) + MQTT + margin must fit (start-up checks it)
MATCH_S = 0.05  # a pulse belongs to the non-accepted part due within this of it


def _raise_priority() -> None:
    """nice -10, as the systemd unit does; ignored where this user may not (not root)."""
    with contextlib.suppress(PermissionError):  # an ordinary user: normal priority, maybe late pulses under load
        os.nice(-10)


class DemoGate:
    """The simulated I/O block and the actuator, running until close(); pulse lines go to stdout as they happen."""

    def __init__(self, out: Path, port: int, *, agent_id: str, line: str, camera: str) -> None:
        self.device = ModbusDevice()
        self._offset = time.time() - time.monotonic()
        self._dues: list[tuple[float, Verdict]] = []  # (due, monotonic) of non-accepted parts
        self._lock = threading.Lock()
        self._printed = 0
        self._stop = threading.Event()
        topic = Topics("lineguard").verdict(line, agent_id, camera)
        self._subscription = Subscription(MqttConfig(port=port), f"demo-gate-{port}", [topic], self._on_verdict)
        config = out / "actuator.toml"
        config.write_text(
            f"""actuator_id = "demo-gate"
line = "{line}"
reject_delay_ms = {DELAY_MS}
[pulse]
late_limit_ms = 25
[[sources]]
agent = "{agent_id}"
cameras = ["{camera}"]
[modbus]
port = {self.device.port}
reject_coil = {REJECT_COIL}
ready_coil = {READY_COIL}
[startup]
status_timeout_s = 120
[mqtt]
port = {port}
[metrics]
port = 0
"""
        )
        self._log = (out / "actuator.log").open("wb")
        command = [str(Path(sys.executable).with_name("lineguard-actuator")), "run", "--config", str(config)]
        # The gate shares two cores with a busy agent here: give it the CPU when a part is due (root only).
        self.process = subprocess.Popen(command, stderr=self._log, preexec_fn=_raise_priority)
        self._printer = threading.Thread(target=self._print_pulses, name="demo-pulses", daemon=True)
        self._printer.start()
        print(
            f"actuator: coil {REJECT_COIL} of a simulated I/O block at modbus://127.0.0.1:{self.device.port} "
            f"pulses {DELAY_MS:.0f} ms after capture for every part not accepted (log: {out / 'actuator.log'})"
        )

    def _on_verdict(self, topic: str, payload: bytes, properties: object) -> None:
        try:
            verdict = decode(Verdict, payload)
        except ContractError:
            return
        if verdict.verdict != "accept":
            with self._lock:
                self._dues.append((verdict.capture_ts + DELAY_MS / 1e3 - self._offset, verdict))

    def _print_pulses(self) -> None:
        while not self._stop.wait(0.05):
            edges = self.device.rising_edges(REJECT_COIL)
            for t in edges[self._printed :]:
                print(self._line(t), flush=True)
            self._printed = max(self._printed, len(edges))

    def _line(self, t: float) -> str:
        with self._lock:
            match = min(self._dues, key=lambda item: abs(item[0] - t), default=None)
        if match is None or abs(match[0] - t) > MATCH_S:
            return f"   PULSE coil {REJECT_COIL}  (no part due here: held on by the fault action, rejecting every part)"
        due, verdict = match
        clock = datetime.fromtimestamp(due + self._offset).strftime("%H:%M:%S.%f")[:-3]
        return (
            f"   PULSE coil {REJECT_COIL}  {verdict.camera} seq {verdict.seq:>4} ({verdict.verdict})  "
            f"due {clock}  actual {(t - due) * 1e3:+.1f} ms"
        )

    def finish(self, timeout_s: float = 10.0) -> int:
        """Wait for the pulses of every part seen so far, print a summary; the number of pulses."""
        with self._lock:
            last_due = max((due for due, _ in self._dues), default=time.monotonic())
            wanted = len(self._dues)
        time.sleep(max(0.0, min(last_due - time.monotonic() + 0.3, timeout_s)))
        time.sleep(0.1)
        pulses = len(self.device.rising_edges(REJECT_COIL))
        print(f"actuator: {pulses} pulses for {wanted} rejected or failsafe parts")
        return pulses

    def close(self) -> None:
        self._stop.set()
        self._printer.join(1.0)
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._subscription.close()
        self.device.close()
        self._log.close()

    def __enter__(self) -> DemoGate:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
