"""Swap pause: the largest gap between consecutive verdicts while a model is hot-swapped, vs steady state.

    OMP_NUM_THREADS=2 .venv/bin/python bench/swap_bench.py [--fps 20] [--swaps 5]

Trains a small brick bundle, runs `lineguard-agent run` on replayed frames at --fps with a local
Mosquitto, and every few seconds swaps between two versions of the bundle with
`lineguard-agent activate`. Reports, for verdicts decided during a swap (from the request to the
model change) and for the rest: the largest gap between consecutive verdicts and the worst
capture-to-publish latency, against the deadline.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from broker import MosquittoBroker  # noqa: E402
from bundle_tools import bundle_variant  # noqa: E402
from mqtt_subscriber import Subscriber  # noqa: E402

from lineguard.agent.contract import Topics, Verdict  # noqa: E402

BIN = Path(sys.executable).parent
DEADLINE_MS = 250.0
VERDICTS = Topics("lineguard").verdict("line-1", "agent-1", "cam0")


def train(root: Path) -> tuple[Path, Path, Path]:
    """(bundle, private key, replay folder) from a small sample dataset."""
    run = [BIN / "lineguard-train"]
    subprocess.run(
        [*run, "make-sample-data", str(root / "data"), "--categories", "brick", "--train", "16"],
        check=True,
        capture_output=True,
    )
    subprocess.run([*run, "keygen", str(root / "key.pem")], check=True, capture_output=True)
    subprocess.run(
        [
            *run,
            "run",
            str(root / "data" / "brick"),
            "--out",
            str(root / "out"),
            "--sign-key",
            str(root / "key.pem"),
            "--model-id",
            "brick",
            "--model-version",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    replay = root / "data" / "brick" / "test" / "good"
    return root / "out" / "bundle", root / "key.pem", replay


def write_config(root: Path, broker: MosquittoBroker, bundle: Path, key: Path, replay: Path, fps: float) -> Path:
    config = root / "agent.toml"
    config.write_text(f"""run_dir = "{root / "run"}"
state_dir = "{root / "state"}"
[[cameras]]
name = "cam0"
address = "{replay}"
fps = {fps}
loop = true
[engine]
bundle = "{bundle}"
trusted_keys = ["{key.with_suffix(".pub")}"]
threads = 1
[decision]
deadline_ms = {DEADLINE_MS}
heatmap = "none"
[mqtt]
port = {broker.port}
[metrics]
port = 0
""")
    return config


def swap_windows(config: Path, versions: list[Path], swaps: int, subscriber: Subscriber) -> list[tuple[float, float]]:
    """Swap `swaps` times; (start, end) wall-clock windows from each request to its answer."""
    windows = []
    for index in range(swaps):
        time.sleep(3.0)
        started = time.time()
        result = subprocess.run(
            [BIN / "lineguard-agent", "activate", "--config", str(config), str(versions[index % 2])],
            capture_output=True,
            text=True,
        )
        windows.append((started, time.time()))
        if result.returncode != 0:
            sys.exit(f"swap failed: {result.stderr}")
    time.sleep(3.0)
    return windows


def summarise(verdicts: list[Verdict], windows: list[tuple[float, float]]) -> dict[str, dict[str, float]]:
    ordered = sorted(verdicts, key=lambda v: v.seq)
    groups: dict[str, dict[str, list[float]]] = {
        "swap": {"gap": [], "latency": []},
        "steady": {"gap": [], "latency": []},
    }
    for before, after in itertools.pairwise(ordered):
        in_swap = any(start - 0.5 <= after.decided_ts <= end + 0.5 for start, end in windows)
        group = groups["swap" if in_swap else "steady"]
        group["gap"].append((after.decided_ts - before.decided_ts) * 1e3)
        group["latency"].append(after.latency_ms.total)
    failsafes = sum(v.verdict == "failsafe" for v in ordered)
    return {
        name: {
            "verdicts": len(g["gap"]),
            "max_gap_ms": round(max(g["gap"]), 1),
            "max_latency_ms": round(max(g["latency"]), 1),
            "failsafes": failsafes,
        }
        for name, g in groups.items()
        if g["gap"]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fps", type=float, default=20.0)
    parser.add_argument("--swaps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle, key, replay = train(root)
        versions = [bundle_variant(bundle, root / f"v{i}", key, model_version=str(i)) for i in (2, 3)]
        with MosquittoBroker(root / "broker") as broker:
            subscriber = Subscriber(broker, VERDICTS)
            config = write_config(root, broker, bundle, key, replay, args.fps)
            agent = subprocess.Popen(
                [BIN / "lineguard-agent", "run", "--config", str(config)],
                stderr=subprocess.DEVNULL,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            try:
                subscriber.wait_until(lambda: len(subscriber.messages) > 20, 60)
                windows = swap_windows(config, versions, args.swaps, subscriber)
            finally:
                agent.send_signal(signal.SIGTERM)
                agent.wait(timeout=30)
            result = summarise(subscriber.verdicts(VERDICTS), windows)
            subscriber.close()
    print(
        json.dumps(
            {
                "fps": args.fps,
                "swaps": args.swaps,
                "deadline_ms": DEADLINE_MS,
                **result,
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            },
            indent=2,
        )
    )
    for name in ("steady", "swap"):
        r = result[name]
        print(
            f"| {name} | {args.fps} | {r['verdicts']} | {r['max_gap_ms']} | {r['max_latency_ms']} | {r['failsafes']} |"
        )


if __name__ == "__main__":
    main()
