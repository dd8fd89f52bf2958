"""Actuator benchmark: pulse timing against the due point, through a real broker to a real Modbus TCP server.

    .venv/bin/python bench/actuator_bench.py [--rates 10,30,100] [--window-s 10] [--delays 8,10,15,20,50]

A stand-in agent (tests/actuator_tools.FakeAgent: contract records, QoS 1, decided at capture) publishes verdicts at
each rate, every third part a reject, to `lineguard-actuator run` (modbus-coil, 3 ms pulses, 2 ms minimum off,
10 ms late limit) driving a simulated I/O block (lineguard.actuator.iosim: a pymodbus TCP server that stamps each
coil write with time.monotonic()). Part 1, at each rate with reject_delay_ms 300: the coil's rising edges against
the parts' due points (capture_ts + delay): p50, p99 and max of the error, pulses vs rejects, late pulses.
Part 2, at the highest rate: the smallest reject_delay_ms (of --delays) with zero late pulses and one pulse per
reject; the agent's own decision.deadline_ms comes on top of it in a real line (README "Timing").
Prints the machine, the command, a Markdown table and the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from actuator_tools import REJECT_COIL, FakeAgent, actuator_command, statuses, wait_state, write_config
from broker import MosquittoBroker
from mqtt_subscriber import Subscriber

from lineguard.actuator.iosim import ModbusDevice
from lineguard.agent.contract import Topics


@dataclasses.dataclass
class Run:
    rate_per_s: float
    reject_delay_ms: float
    refused: bool = False  # start-up refused the delay (below deadline + round trip)
    parts: int = 0
    rejects: int = 0
    pulses: int = 0
    late_pulses: int = 0
    unguarded: int = 0
    late_verdicts: int = 0
    error_p50_ms: float | None = None
    error_p99_ms: float | None = None
    error_max_ms: float | None = None

    def holds(self) -> bool:
        return not self.refused and self.late_pulses == 0 and self.unguarded == 0 and self.pulses == self.rejects


PULSE = "[pulse]\nwidth_ms = 3\nmin_off_ms = 2\nlate_limit_ms = 10\n"


def one_run(folder: Path, rate: float, delay_ms: float, window_s: float) -> Run:
    folder.mkdir(parents=True)
    with MosquittoBroker(folder / "broker") as broker:
        device = ModbusDevice()
        agent = FakeAgent(broker, deadline_ms=6.0)  # it decides 5 ms after capture
        subscriber = Subscriber(broker, Topics("lineguard").actuator_status("gate-1"))
        config = write_config(folder, broker, device, delay_ms=delay_ms)
        text = config.read_text()
        start, end = text.index("[pulse]"), text.index("[fault]")
        config.write_text((text[:start] + PULSE + "\n" + text[end:]).replace("margin_ms = 50", "margin_ms = 0"))
        log = (folder / "actuator.log").open("wb")
        process = subprocess.Popen(actuator_command("run", "--config", str(config)), stderr=log)
        try:
            if not subscriber.wait_until(lambda: bool(statuses(subscriber)) or process.poll() is not None, 60):
                msg = f"the actuator did not start; see {folder / 'actuator.log'}"
                raise RuntimeError(msg)
            if process.poll() is not None:  # refused at start-up: below deadline + round trip
                return Run(rate, delay_ms, refused=True)
            wait_state(subscriber, "ok")
            offset = time.time() - time.monotonic()
            rng = random.Random(7)
            dues: list[float] = []
            t0 = time.monotonic() + 0.2
            count = int(rate * window_s)
            for index in range(count):
                time.sleep(max(0.0, t0 + index / rate - time.monotonic()))
                kind = "reject" if rng.random() < 1 / 3 else "accept"
                verdict = agent.verdict(kind)
                if kind == "reject":
                    dues.append(verdict.capture_ts + delay_ms / 1e3 - offset)
            time.sleep(delay_ms / 1e3 + 0.5)
            pulses = device.rising_edges(REJECT_COIL, after=t0 - 0.01)
            process.terminate()
            process.wait(timeout=20)
            final = statuses(subscriber)[-1]
        finally:
            if process.poll() is None:
                process.kill()
            agent.close()
            subscriber.close()
            device.close()
            log.close()
    matched = [min(pulses, key=lambda p, d=due: abs(p - d)) - due for due in dues if pulses]
    errors_ms = np.array([e * 1e3 for e in matched if abs(e) < 0.05])

    def percentile(q: float) -> float | None:
        return round(float(np.percentile(errors_ms, q)), 3) if errors_ms.size else None

    return Run(
        rate,
        delay_ms,
        False,
        final.parts,
        len(dues),
        len(pulses),
        final.late_pulses,
        final.unguarded,
        final.late_verdicts,
        percentile(50),
        percentile(99),
        percentile(100),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="10,30,100")
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--delays", default="8,10,15,20,50")
    args = parser.parse_args()
    rates = [float(each) for each in args.rates.split(",")]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print("command: " + shlex.join(["python", *sys.argv]))
    timing: list[Run] = []
    delays: list[Run] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for rate in rates:
            timing.append(one_run(root / f"rate-{rate:g}", rate, 300.0, args.window_s))
        for delay in (float(each) for each in args.delays.split(",")):
            delays.append(one_run(root / f"delay-{delay:g}", max(rates), delay, args.window_s / 2))
    print("\n| parts/s | reject_delay_ms | parts | rejects | pulses | late pulses | error p50 | p99 | max |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in timing + delays:
        if run.refused:
            print(f"| {run.rate_per_s:g} | {run.reject_delay_ms:g} | refused at start-up (below the budget) |")
            continue
        print(
            f"| {run.rate_per_s:g} | {run.reject_delay_ms:g} | {run.parts} | {run.rejects} | {run.pulses} "
            f"| {run.late_pulses} | {run.error_p50_ms} ms | {run.error_p99_ms} ms | {run.error_max_ms} ms |"
        )
    held = [run.reject_delay_ms for run in delays if run.holds()]
    smallest = min(held) if held else None
    print(f"\nsmallest reject_delay_ms with zero late pulses at {max(rates):g} parts/s: {smallest}")
    results = {
        "timing": [dataclasses.asdict(run) for run in timing],
        "delays": [dataclasses.asdict(run) for run in delays],
        "smallest_delay_ms": smallest,
    }
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
