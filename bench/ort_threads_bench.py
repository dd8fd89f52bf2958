"""ONNX Runtime thread pools when an engine holds more than one session: idle threads spinning or sleeping.

One process, one graph loaded as N sessions (N = 1: one model; N = 2: two models, or a model and
its shadow or incoming swap), batch-1 runs taking turns between the sessions with a gap between
frames (as frames arrive from cameras). Rows, side by side in one run, interleaved round by round:
ONNX Runtime's default (each session's idle threads spin after a run) and the agent's setting
(`agent/engine/backends/onnxrt.py` SESSION_CONFIG: idle threads sleep). Prints median and p90 ms
per run and the process's busy cores over the whole loop (gaps included).

    OMP_NUM_THREADS=2 .venv/bin/python bench/ort_threads_bench.py OUT/export/model.onnx [--frames 120 --gap-ms 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort

from lineguard.agent.engine.backends.onnxrt import SESSION_CONFIG


def sessions(path: str, count: int, *, spin: bool) -> list[ort.InferenceSession]:
    out = []
    for _ in range(count):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if not spin:
            for key, value in SESSION_CONFIG.items():
                options.add_session_config_entry(key, value)
        out.append(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
    return out


def turn(group: list[ort.InferenceSession], frame: np.ndarray, frames: int, gap_s: float) -> tuple[list[float], float]:
    """Run `frames` frames taking turns between the sessions; (per-run seconds, busy cores over the loop)."""
    times = []
    wall, cpu = time.perf_counter(), time.process_time()
    for index in range(frames):
        started = time.perf_counter()
        group[index % len(group)].run(None, {"image": frame})
        times.append(time.perf_counter() - started)
        time.sleep(gap_s)
    return times, (time.process_time() - cpu) / (time.perf_counter() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graph")
    parser.add_argument("--frames", type=int, default=120, help="runs per row and round (default 120)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the rows alternate within each (default 3)")
    parser.add_argument("--gap-ms", type=float, default=10.0, help="pause between frames (default 10)")
    args = parser.parse_args()
    rows = {(n, spin): sessions(args.graph, n, spin=spin) for n in (1, 2) for spin in (True, False)}
    shape = [1, *rows[(1, True)][0].get_inputs()[0].shape[1:]]
    frame = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    results: dict[tuple[int, bool], tuple[list[float], list[float]]] = {key: ([], []) for key in rows}
    for group in rows.values():
        for session in group:
            session.run(None, {"image": frame})
    for _ in range(args.rounds):
        for key, group in rows.items():
            times, cores = turn(group, frame, args.frames, args.gap_ms / 1000)
            results[key][0].extend(times)
            results[key][1].append(cores)
    print("| sessions | idle threads | median ms | p90 ms | busy cores | median vs sleeping, same sessions |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (n, spin), (times, cores) in results.items():
        median = 1000 * statistics.median(times)
        sleeping = 1000 * statistics.median(results[(n, False)][0])
        print(
            f"| {n} | {'spin (ONNX Runtime default)' if spin else 'sleep (the agent)'} | {median:.1f} "
            f"| {1000 * float(np.quantile(times, 0.9)):.1f} | {statistics.mean(cores):.2f} | {median / sleeping:.2f}x |"
        )


if __name__ == "__main__":
    main()
