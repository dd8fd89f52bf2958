"""Sample store benchmark: agent throughput and latency with the store off, on (defaults) and keeping every frame.

    OMP_NUM_THREADS=2 .venv/bin/python bench/samples_bench.py [--loads 10,30] [--window-s 15] [--repeats 1]

The setup of bench/agent_bench.py (a bundle from `lineguard-train run`, its no-op twin, 16 distinct 2448x2048
mono8 frames replayed in a loop, a 2048x2048 ROI), run through `lineguard-agent run` in these variants, side by
side at each offered load, interleaved so a drifting machine hits all of them alike:
- store off: samples.enabled = false
- store on: the defaults (rejects, failsafes, close calls, 1 in 200 accepts; at most 60 samples a minute)
- every frame: every verdict kept (close_call_margin 1, random_one_in 1, max_per_minute 100000): the worst
  case, each frame's ROI cropped and resized on the decision thread and a PNG, a map and a thumbnail written
  (fsync'd) per frame by the writer thread
each with the real model and with the no-op engine (a graph that returns zeros: the pipeline's own overhead,
where the store's cost would show most). Latency is capture to handed-to-MQTT (`latency_ms.total`) of scored
verdicts during the window; "samples/s" counts SampleRecords announced. Prints a Markdown table with the p99
ratio of each variant to "store off" at the same load and engine, and the JSON.

First, in-process and independent of the machine's other load: what one `SampleSink.offer` costs the
decision thread (median and p99 of 200 calls on a real ring slot holding a 2448x2048 frame), for a verdict the
policy skips, one it keeps (the ROI crop and resize to the model's view, the copy into the queue), and one the
per-minute budget drops. `--offer-only` runs just that.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from agent_bench import (
    BIN,
    Run,
    Setup,
    TimedSubscriber,
    agent_config,
    collect,
    command_line,
    fmt,
    machine,
    prepare,
    summarise,
)
from broker import MosquittoBroker

from lineguard.agent.contract import Topics

STORE = {
    "store off": "[samples]\nenabled = false\n",
    "store on": "[samples]\nenabled = true\n",
    "every frame": "[samples]\nclose_call_margin = 1.0\nrandom_one_in = 1\nmax_per_minute = 100000\n",
}


def run_variant(
    setup: Setup, broker: MosquittoBroker, engine: str, store: str, load: str, args: argparse.Namespace
) -> dict[str, Any]:
    """One agent run; the summary of agent_bench plus the samples announced during the window."""
    slug = f"{engine}-{store.replace(' ', '')}-{load}-{time.monotonic_ns() % 10**6}"
    run_dir = setup.work / f"lgsb-{os.getpid()}-{slug}"
    run_dir.mkdir()
    bundle = setup.noop_bundle if engine == "no-op" else setup.bundle
    config = agent_config(setup, run_dir, broker, bundle, float(load))
    config.write_text(config.read_text() + STORE[store])
    topics = Topics(run_dir.name)
    subscriber = TimedSubscriber(broker, topics.verdict("line-1", run_dir.name, "cam0"))
    samples = TimedSubscriber(broker, topics.sample("line-1", run_dir.name, "cam0"))
    log = (run_dir / "agent.log").open("wb")
    agent = subprocess.Popen([str(BIN / "lineguard-agent"), "run", "--config", str(config)], stderr=log)
    run = Run(f"{engine}, {store}", load, args.window_s)
    try:
        collect(subscriber, run, args.warmup_s, lambda: agent.poll() is None)
        window_end = time.time()
        announced = sum(1 for t, _ in samples.arrivals if window_end - args.window_s <= t < window_end)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        log.close()
        subscriber.close()
        samples.close()
    row = summarise(run)
    row["samples_per_s"] = round(announced / args.window_s, 2)
    row["engine"], row["store"] = engine, store
    return row


def offer_costs(setup: Setup) -> dict[str, dict[str, float]]:
    """Decision-thread microseconds per SampleSink.offer: skipped, kept (with pixels), dropped by the rate limit."""
    import numpy as np

    from lineguard.agent.bundle import MANIFEST_FILE, parse_manifest
    from lineguard.agent.config import AgentConfig, CameraConfig, RoiConfig, SamplesConfig
    from lineguard.agent.contract import Latency, Verdict
    from lineguard.agent.decision.heatmap import render_heatmap
    from lineguard.agent.messages import FrameReady
    from lineguard.agent.ring import AttachedRings, ShmRing
    from lineguard.agent.samples.writer import SampleSink

    manifest = parse_manifest((setup.bundle / MANIFEST_FILE).read_bytes(), source="bench")
    camera = CameraConfig(name="cam0", roi=RoiConfig(x=200, y=0, width=2048, height=2048))
    ring = ShmRing.create(f"lg-sbench-{os.getpid()}", slot_count=4, slot_shape=(2048, 2448, 1), dtype=np.uint8)
    costs: dict[str, dict[str, float]] = {}
    try:
        slot = ring.acquire(1, now_ns=time.monotonic_ns(), reclaim_after_ns=10**12)
        assert slot is not None
        ring.array(slot)[...] = np.random.default_rng(0).integers(0, 256, (2048, 2448, 1), dtype=np.uint8)
        ring.publish(slot, 1, t_capture_ns=time.monotonic_ns())
        ready = FrameReady("cam0", 1, ring.name, slot, time.monotonic_ns(), 2048, 2448, 1)
        threshold = manifest.threshold.value
        cases = {"skipped (plain accept)": (0.0, 10**6), "kept (reject, with pixels)": (threshold + 1, 10**6)}
        cases["dropped (over the minute's budget)"] = (threshold + 1, 1)
        for name, (score, per_minute) in cases.items():
            settings = SamplesConfig(random_one_in=0, max_per_minute=per_minute, queue_length=1024, min_free_bytes=0)
            config = AgentConfig(
                agent_id="bench", state_dir=setup.work / f"offer-{len(costs)}", cameras=(camera,), samples=settings
            )
            sink = SampleSink(config, rings=AttachedRings(), publisher=None, overlay=render_heatmap)
            verdict = Verdict(
                agent_id="bench",
                line="line-1",
                camera="cam0",
                seq=1,
                capture_ts=1.0,
                decided_ts=1.0,
                verdict="reject" if score >= threshold else "accept",
                reason="bench",
                score=score,
                threshold=threshold,
                model="brick-bench@1",
                latency_ms=Latency(total=1.0),
            )
            sink.offer(verdict, ready=ready, manifest=manifest)  # warm-up (and, for "dropped", spends the budget)
            times = []
            for seq in range(2, 202):
                timed = verdict.model_copy(update={"seq": seq})
                started = time.perf_counter()
                sink.offer(timed, ready=ready, manifest=manifest)
                times.append((time.perf_counter() - started) * 1e6)  # 200 offers fit the 1024-long queue: none waits
            sink.close(timeout_s=120)
            costs[name] = {
                "median_us": round(float(np.median(times)), 1),
                "p99_us": round(float(np.percentile(times, 99)), 1),
            }
    finally:
        ring.close()
    return costs


def table(rows: list[dict[str, Any]]) -> str:
    """One row per run; p99 / p99 of "store off" at the same engine and load (first repeat)."""
    base = {}
    for row in rows:
        if row["store"] == "store off":
            base.setdefault((row["engine"], row["offered_fps"]), row["total_ms"]["p99"])
    lines = [
        "| engine | store | offered fps | delivered fps | failsafe % | samples/s | p50 ms | p99 ms | p99 / store off p99 | CPU cores ours / others |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        p99, reference = row["total_ms"]["p99"], base.get((row["engine"], row["offered_fps"]))
        ratio = f"{p99 / reference:.2f}x" if p99 and reference else ""
        lines.append(
            f"| {row['engine']} | {row['store']} | {row['offered_fps']} | {fmt(row['delivered_fps'])} "
            f"| {fmt(row['failsafe_pct'])} | {fmt(row['samples_per_s'])} | {fmt(row['total_ms']['p50'])} | {fmt(p99)} "
            f"| {ratio} | {fmt(row['cpu_cores'].get('ours'), 2)} / {fmt(row['cpu_cores'].get('others'), 2)} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", default="10,30", help="offered loads in fps (default 10,30)")
    parser.add_argument("--engines", default="real,no-op", help="real and/or no-op (default both)")
    parser.add_argument("--window-s", type=float, default=15.0, help="measured seconds per run (default 15)")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="seconds discarded after the first verdict")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, interleaved (default 1)")
    parser.add_argument("--offer-only", action="store_true", help="only the decision thread's cost per offer")
    args = parser.parse_args()
    args.loads = [load.strip() for load in args.loads.split(",") if load.strip()]
    args.engines = [engine.strip() for engine in args.engines.split(",") if engine.strip()]
    return args


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    host = machine()
    print(f"machine: {host}\ncommand: {command_line()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lg-samples-bench-") as tmp:
        setup = prepare(Path(tmp))
        print(f"setup done in {time.monotonic() - started:.0f} s", file=sys.stderr)
        offers = offer_costs(setup)
        print("decision thread per offer: " + json.dumps(offers), flush=True)
        if args.offer_only:
            return
        with MosquittoBroker(Path(tmp) / "broker") as broker:
            for engine in args.engines:
                for load in args.loads:
                    for _ in range(args.repeats):
                        for store in STORE:
                            rows.append(run_variant(setup, broker, engine, store, load, args))
                            row = rows[-1]
                            print(
                                f"  {engine}, {store} at {load} fps: p99 {row['total_ms']['p99']} ms, "
                                f"{row['samples_per_s']} samples/s, failsafe {row['failsafe_pct']} %",
                                file=sys.stderr,
                            )
    host["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print("\n" + table(rows) + "\n")
    report = {
        "machine": host,
        "command": command_line(),
        "runs": rows,
        "bench_seconds": round(time.monotonic() - started),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
