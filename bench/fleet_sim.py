"""Fleet simulation: N simulated agents on one Mosquitto; broker CPU, verdict latency, time to push a bundle to all.

    nice -n 5 .venv/bin/python bench/fleet_sim.py [--agents 50,100,200] [--fps 5] [--steady-s 15] [--bundle-mb 4]
        [--senders 4] [--agents-per-process 25]

Each simulated agent is the agent's own MQTT half without cameras or a model: the real MqttPublisher
(agent/mqtt/publisher.py: MQTT 5, persistent session, last will) publishing one Verdict per frame of one camera at
--fps (QoS 1; agents' phases staggered) and its retained AgentStatus every STATUS_PERIOD_S, and the real
BundleReceiver (agent/rollout/receiver.py and staging.py: chunks staged on disk, the archive's sha256 checked, the
bundle unpacked). Its on_bundle accepts at once (no model is loaded: this measures the transport) and its admit
accepts every push (operator signatures are tested in tests/, not timed here). The agents run in worker processes of
--agents-per-process each (hundreds of paho threads in one CPython process starve each other and would measure the
simulator, not the broker); the main process subscribes to every verdict, and pushes with the real BundleSender (deploy/sender.py,
what `lineguard-deploy push` runs): --senders senders in parallel, each pushing to its share of the agents in turn.

Per N, one fresh broker (tests/broker.py: max_queued_messages 100000, no persistence):
- steady: --steady-s of verdict and status traffic. Broker CPU (share of one core, from /proc/PID/stat), verdicts
  per second received, latency = arrival - decided_ts (stamped as the simulated agent publishes; one clock).
- push: one bundle (--bundle-mb of random bytes; a PatchCore bundle is about 4 MB) to all N agents while the traffic
  goes on: wall time from the first send to the last acceptance, broker CPU, verdict latency meanwhile.
- lost: verdicts the broker acknowledged that the subscriber never got (after the agents stop, the subscriber gets
  until nothing more arrives for 10 s: `drain` is how long its backlog took).
Prints the machine, the command, a Markdown table with ratios to the smallest N, and the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from agent_bench import command_line, machine, machine_busy_s
from broker import MosquittoBroker

from lineguard.agent.config import MqttConfig
from lineguard.agent.contract import ANY, AgentStatus, CameraStatus, Latency, Topics, TransferMeta, Verdict, decode
from lineguard.agent.decision.process import STATUS_PERIOD_S
from lineguard.agent.mqtt import MqttPublisher
from lineguard.agent.rollout.receiver import BundleReceiver
from lineguard.deploy.sender import BundleSender

TOPICS = Topics("lineguard")
LINE, CAMERA, MODEL = "line-1", "cam0", "brick@1.0.0"
TICK_S = 0.005


# --- the simulated agents (worker processes) ---------------------------------------------------------------------


@dataclass
class SimAgent:
    """One simulated agent: its publisher, its receiver, and where its camera's sequence stands."""

    agent_id: str
    publisher: MqttPublisher
    receiver: BundleReceiver
    next_frame: float
    seq: int = 0
    bundles: int = 0


def status(agent_id: str, *, online: bool, fps: float) -> AgentStatus:
    cameras = {CAMERA: CameraStatus(fps=fps, expected_fps=fps)} if online else {}
    reason = "" if online else "connection lost"
    return AgentStatus(
        agent_id=agent_id, line=LINE, online=online, model=MODEL, cameras=cameras, reason=reason, ts=time.time()
    )


def verdict(agent_id: str, seq: int) -> Verdict:
    now = time.time()
    return Verdict(
        agent_id=agent_id,
        line=LINE,
        camera=CAMERA,
        seq=seq,
        capture_ts=now,
        decided_ts=now,
        verdict="accept",
        reason="score 0.100 < threshold 0.500",
        score=0.1,
        threshold=0.5,
        model=MODEL,
        latency_ms=Latency(total=0.0),
    )


def start_agent(agent_id: str, config: MqttConfig, staging: Path, phase_s: float) -> SimAgent:
    holder: list[SimAgent] = []

    def accept(path: Path, meta: TransferMeta) -> tuple[bool, str]:
        holder[0].bundles += 1
        return True, f"{meta.model} received (simulated install)"

    publisher = MqttPublisher(
        config,
        client_id=f"lineguard-{agent_id}",
        status_topic=TOPICS.status(agent_id),
        will=status(agent_id, online=False, fps=0.0),
    )
    receiver = BundleReceiver(
        config, agent_id=agent_id, staging_dir=staging / agent_id, on_bundle=accept, admit=lambda meta: ""
    )
    holder.append(SimAgent(agent_id, publisher, receiver, time.monotonic() + phase_s))
    return holder[0]


def run_agents(agent_ids: list[str], port: int, fps: float, staging: str, ready: Any, stop: Any, out: Any) -> None:
    """A worker process: start its agents, publish until `stop`, then report what each published and received."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = MqttConfig(host="127.0.0.1", port=port)
    period_s = 1.0 / fps
    agents = [start_agent(a, config, Path(staging), random.random() * period_s) for a in agent_ids]
    for agent in agents:
        if not (agent.publisher.wait_connected(60) and agent.receiver.wait_subscribed(60)):
            out.put({"error": f"{agent.agent_id} did not connect within 60 s"})
            return
        agent.publisher.publish(
            TOPICS.status(agent.agent_id), status(agent.agent_id, online=True, fps=fps), qos=1, retain=True
        )
    ready.release()
    next_status = time.monotonic() + STATUS_PERIOD_S
    while not stop.is_set():
        now = time.monotonic()
        for agent in agents:
            while agent.next_frame <= now:  # a late tick publishes what was due: the rate stays --fps
                agent.seq += 1
                agent.publisher.publish(
                    TOPICS.verdict(LINE, agent.agent_id, CAMERA), verdict(agent.agent_id, agent.seq), qos=1
                )
                agent.next_frame += period_s
        if now >= next_status:
            for agent in agents:
                agent.publisher.publish(
                    TOPICS.status(agent.agent_id), status(agent.agent_id, online=True, fps=fps), qos=1, retain=True
                )
            next_status += STATUS_PERIOD_S
        time.sleep(TICK_S)
    report = {}
    for agent in agents:  # every verdict to the broker (PUBACK) before the count; the FIFO keeps their order
        agent.publisher.flush(30)
        unsent = agent.publisher.queued
        agent.receiver.close()
        agent.publisher.close(offline_status=status(agent.agent_id, online=False, fps=0.0), flush_timeout_s=10)
        counts = {
            "published": agent.seq,
            "unsent": unsent,
            "bundles": agent.bundles,
            "dropped": agent.publisher.dropped,
        }
        report[agent.agent_id] = counts
    out.put(report)


# --- the plant side (main process) --------------------------------------------------------------------------


class VerdictClock:
    """Every verdict on the broker: (arrival wall time, latency ms) in arrival order, and the keys seen."""

    def __init__(self, broker: MosquittoBroker) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.arrivals: list[tuple[float, float]] = []
        self.keys: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        subscribed = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fleet-plant", protocol=MQTTProtocolVersion.MQTTv5)
        client.max_inflight_messages_set(100)
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(TOPICS.verdict(LINE, ANY, CAMERA), qos=1)
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = self._on_message
        client.connect(broker.host, broker.port)
        client.loop_start()
        self._client = client
        if not subscribed.wait(10):
            msg = "the plant-side subscriber could not subscribe"
            raise RuntimeError(msg)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        arrived = time.time()
        record = decode(Verdict, message.payload)
        with self._lock:
            self.arrivals.append((arrived, (arrived - record.decided_ts) * 1000.0))
            self.keys.add((record.agent_id, record.seq))

    def drain(self, expected: set[tuple[str, int]], *, quiet_s: float = 10.0) -> float:
        """Wait until every expected verdict is in, or none has come for quiet_s; the seconds it took."""
        started = since = time.monotonic()
        seen = len(self.keys)
        while not expected <= self.keys and time.monotonic() - since < quiet_s:
            time.sleep(0.5)
            if len(self.keys) > seen:
                seen, since = len(self.keys), time.monotonic()
        return time.monotonic() - started

    def between(self, start: float, end: float) -> list[float]:
        with self._lock:
            return [latency for arrived, latency in self.arrivals if start <= arrived < end]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Window:
    """A measured stretch of one run: wall clock, and CPU seconds of the broker, of the simulated agents' processes
    and of the whole machine, at both ends."""

    broker: int
    simulators: list[int]
    start: float = field(default_factory=time.time)
    cpu_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    end: float = 0.0
    cpu_end: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        self.cpu_start = self._cpu()

    def _cpu(self) -> tuple[float, float, float]:
        return process_cpu_s(self.broker), sum(process_cpu_s(pid) for pid in self.simulators), machine_busy_s()

    def close(self) -> None:
        self.end, self.cpu_end = time.time(), self._cpu()

    def summary(self, clock: VerdictClock) -> dict[str, Any]:
        latencies = clock.between(self.start, self.end)
        seconds = self.end - self.start
        p = np.percentile(latencies, [50, 99]) if latencies else [float("nan")] * 2
        broker, simulators, machine_busy = (
            100 * (b - a) / seconds for a, b in zip(self.cpu_start, self.cpu_end, strict=True)
        )
        return {
            "seconds": round(seconds, 1),
            "broker_cpu_pct": round(broker, 1),
            "simulators_cpu_pct": round(simulators, 1),
            "machine_busy_pct": round(machine_busy, 1),
            "verdicts_per_s": round(len(latencies) / seconds, 1),
            "latency_ms": {
                "p50": round(float(p[0]), 2),
                "p99": round(float(p[1]), 2),
                "max": round(max(latencies, default=float("nan")), 1),
            },
        }


def make_bundle(folder: Path, megabytes: float) -> Path:
    """A bundle-shaped folder: random model bytes (incompressible, like weights), a manifest naming the model."""
    folder.mkdir(parents=True)
    rng = random.Random(7)
    (folder / "model.onnx").write_bytes(rng.randbytes(int(megabytes * 2**20)))
    (folder / "manifest.json").write_text(
        json.dumps({"schema_version": 1, "model_id": "brick", "model_version": "2.0.0", "files": {}})
    )
    (folder / "manifest.sig").write_text(json.dumps({"key_id": "bench", "signature": "00"}))
    return folder


def push_to_all(config: MqttConfig, bundle: Path, agent_ids: list[str], senders: int) -> dict[str, Any]:
    """`senders` BundleSenders in parallel, each pushing to every senders-th agent in turn; per-push seconds."""
    seconds: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def share(index: int) -> None:
        with BundleSender(config, client_id=f"fleet-push-{index}") as sender:
            for agent_id in agent_ids[index::senders]:
                try:
                    result = sender.send(bundle, agent_id=agent_id, timeout_s=300)
                except Exception as error:  # noqa: BLE001 - a failed push is a result to report, not a crash
                    with lock:
                        failures.append(f"{agent_id}: {error}")
                    continue
                with lock:
                    seconds.append(result.elapsed_s)

    threads = [threading.Thread(target=share, args=(i,), name=f"push-{i}") for i in range(senders)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "all_s": round(time.monotonic() - started, 1),
        "per_push_s": {"p50": round(float(np.median(seconds)), 2), "max": round(max(seconds), 2)} if seconds else None,
        "failures": failures,
    }


def run_fleet(n: int, args: argparse.Namespace, work: Path, bundle: Path) -> dict[str, Any]:
    broker = MosquittoBroker(work / f"broker-{n}")
    clock = VerdictClock(broker)
    ids = [f"sim{n}-{i:03d}-{os.getpid()}" for i in range(n)]
    context = multiprocessing.get_context("spawn")
    ready, stop, out = context.Semaphore(0), context.Event(), context.Queue()
    processes = max(1, -(-n // args.agents_per_process))
    shares = [ids[i::processes] for i in range(processes)]
    workers = [
        context.Process(
            target=run_agents, args=(share, broker.port, args.fps, str(work / f"staging-{n}"), ready, stop, out)
        )
        for share in shares
        if share
    ]
    try:
        for worker in workers:
            worker.start()
        for _ in workers:
            if not ready.acquire(timeout=300):
                msg = f"the simulated agents did not all connect; broker log:\n{broker.log_tail()}"
                raise RuntimeError(msg)
        time.sleep(args.warmup_s)
        simulators = [worker.pid for worker in workers if worker.pid is not None]
        steady = Window(broker.pid, simulators)
        time.sleep(args.steady_s)
        steady.close()
        pushing = Window(broker.pid, simulators)
        push = push_to_all(MqttConfig(host=broker.host, port=broker.port), bundle, ids, args.senders)
        pushing.close()
        stop.set()
        reports: dict[str, Any] = {}
        for _ in workers:
            reports.update(out.get(timeout=120))
        for worker in workers:
            worker.join(60)
        expected = {(a, s) for a, r in reports.items() for s in range(1, r["published"] - r["unsent"] + 1)}
        drain_s = clock.drain(expected)
    finally:
        stop.set()
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        clock.close()
        broker.close()
    if "error" in reports:
        raise RuntimeError(reports["error"])
    return {
        "agents": n,
        "fps_per_agent": args.fps,
        "steady": steady.summary(clock),
        "push": {**pushing.summary(clock), **push, "bundle_mb": args.bundle_mb, "senders": args.senders},
        "bundles_accepted": sum(r["bundles"] for r in reports.values()),
        "verdicts_published": sum(r["published"] for r in reports.values()),
        "verdicts_unsent_at_stop": sum(r["unsent"] for r in reports.values()),  # still in an agent's queue
        "verdicts_lost": len(expected - clock.keys),  # acknowledged by the broker, never delivered
        "subscriber_drain_s": round(drain_s, 1),  # after the agents stopped, until the subscriber had them all
        "dropped_by_publishers": sum(r["dropped"] for r in reports.values()),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """One row per fleet size; CPU is % of one core (the machine has os.cpu_count() of them)."""
    base = rows[0]
    head = (
        "| agents | verdicts/s | broker CPU | simulated agents' CPU / machine busy | verdict latency p50 / p99 "
        "| pushing: broker CPU | pushing: latency p99 | push to all | per push p50 | lost (subscriber drain) "
        f"| ratio to N={base['agents']}: agents, broker CPU, push to all |"
    )
    lines = [head, "| " + " | ".join(["---"] * 11) + " |"]
    for row in rows:
        steady, push = row["steady"], row["push"]
        ratios = (
            f"{row['agents'] / base['agents']:.1f}x, "
            f"{steady['broker_cpu_pct'] / max(base['steady']['broker_cpu_pct'], 0.1):.1f}x, "
            f"{push['all_s'] / max(base['push']['all_s'], 0.1):.1f}x"
        )
        per_push = push["per_push_s"]["p50"] if push["per_push_s"] else "-"
        cells = [
            row["agents"],
            steady["verdicts_per_s"],
            f"{steady['broker_cpu_pct']} %",
            f"{steady['simulators_cpu_pct']} % / {steady['machine_busy_pct']} %",
            f"{steady['latency_ms']['p50']} / {steady['latency_ms']['p99']} ms",
            f"{push['broker_cpu_pct']} %",
            f"{push['latency_ms']['p99']} ms",
            f"{push['all_s']} s ({row['bundles_accepted']}/{row['agents']})",
            f"{per_push} s",
            f"{row['verdicts_lost']} (drain {row['subscriber_drain_s']} s)",
            ratios,
        ]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--agents", default="50,100,200", help="fleet sizes, comma-separated")
    parser.add_argument("--fps", type=float, default=5.0, help="verdicts per second per agent (one camera)")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--steady-s", type=float, default=15.0)
    parser.add_argument("--bundle-mb", type=float, default=4.0)
    parser.add_argument("--senders", type=int, default=4, help="BundleSenders pushing in parallel")
    parser.add_argument(
        "--agents-per-process",
        type=int,
        default=25,
        help="simulated agents per worker process (more starve each other)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    sizes = [int(each) for each in args.agents.split(",")]
    facts = machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lg-fleet-") as folder:
        work = Path(folder)
        bundle = make_bundle(work / "bundle", args.bundle_mb)
        for n in sizes:
            started = time.monotonic()
            rows.append(run_fleet(n, args, work, bundle))
            shutil.rmtree(work / f"staging-{n}", ignore_errors=True)
            row = rows[-1]
            print(
                f"  N={n}: broker {row['steady']['broker_cpu_pct']} % steady, p99 {row['steady']['latency_ms']['p99']} ms, "
                f"push to all {row['push']['all_s']} s, lost {row['verdicts_lost']} ({time.monotonic() - started:.0f} s)",
                file=sys.stderr,
            )
    print(f"machine: {json.dumps(facts)}")
    print(f"command: {command_line()}")
    print(markdown(rows))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
