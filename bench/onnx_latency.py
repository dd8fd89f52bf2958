"""ONNX Runtime CPU ms per image at batch 1 for exported graphs, interleaved so machine load hits each alike.

    OMP_NUM_THREADS=2 .venv/bin/python bench/onnx_latency.py OUT1/export/model.onnx OUT2/export/model.onnx ...

Each graph gets a session (ONNX Runtime's default threads: 2 on the 2-core dev VM); rounds of 20
batch-1 runs on random frames alternate between the graphs; the median per graph is printed.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from lineguard.trainer.export import cpu_session

ROUNDS, RUNS = 5, 20


def main() -> None:
    sessions = {path: cpu_session(path) for path in sys.argv[1:]}
    times: dict[str, list[float]] = {path: [] for path in sessions}
    rng = np.random.default_rng(0)
    for _ in range(ROUNDS):
        for path, session in sessions.items():
            shape = [1, *session.get_inputs()[0].shape[1:]]
            frame = rng.integers(0, 256, shape, dtype=np.uint8)
            session.run(None, {"image": frame})
            for _ in range(RUNS):
                started = time.perf_counter()
                session.run(None, {"image": frame})
                times[path].append((time.perf_counter() - started) * 1000)
    for path, samples in times.items():
        print(f"| {path} | {statistics.median(samples):.1f} |")


if __name__ == "__main__":
    main()
