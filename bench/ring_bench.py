"""Frame transport benchmark: shared-memory ring + one ZeroMQ notification, against frames copied through ZeroMQ.

    .venv/bin/python bench/ring_bench.py [--frames 2000] [--paced-frames 150] [--paced-fps 50]

A producer process writes 2448x2048 Mono8 frames (a 5 MB copy into the slot, standing in for the camera's DMA)
and announces each with a FrameReady sent through lineguard.agent.ipc; the consumer (this process) checks the
slot's seq, reads the view (checking the frame's stamp bytes) and releases the slot. The baseline sends the same
frames as two-part ZeroMQ messages with copy=True. Throughput is free-running (the ring applies back-pressure
through acquire() returning None; ZeroMQ through a high-water mark of `--slots`). Latency (sent -> readable in
the consumer, one monotonic clock) is measured separately at a camera-like `--paced-fps`, so queueing behind
a full pipeline does not count as transport time. Prints a Markdown table row for BENCHMARKS.md and the JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import zmq

from lineguard.agent.ipc import Receiver, Sender, endpoint
from lineguard.agent.messages import FrameReady
from lineguard.agent.ring import ShmRing

HEIGHT, WIDTH = 2048, 2448
WARM_UP = 20  # first frames (page faults on first touch of each slot) are not measured


def source_frame() -> np.ndarray:
    y, x = np.indices((HEIGHT, WIDTH))
    return ((x + y) % 255).astype(np.uint8)


def stamp(frame: np.ndarray, seq: int) -> None:
    """Mark the frame with its seq in the first and last pixel, so the consumer can check it got the right one."""
    frame[0, 0] = frame[-1, -1] = seq % 256


def pace(started: float, index: int, fps: float) -> None:
    if fps > 0:
        time.sleep(max(0.0, started + index / fps - time.perf_counter()))


def produce_ring(ring_name: str, address: str, frames: int, fps: float) -> None:
    """Producer process: slot write + FrameReady, like capture."""
    source = source_frame()
    context = zmq.Context()
    with ShmRing.attach(ring_name) as ring, Sender(context, address) as sender:
        started = time.perf_counter()
        for seq in range(frames):
            pace(started, seq, fps)
            slot = ring.acquire(seq, now_ns=time.monotonic_ns(), reclaim_after_ns=10**12)
            while slot is None:  # full: the bench waits where capture would fail the frame
                time.sleep(0.0001)
                slot = ring.acquire(seq, now_ns=time.monotonic_ns(), reclaim_after_ns=10**12)
            frame = ring.array(slot)
            np.copyto(frame, source)
            stamp(frame, seq)
            ring.publish(slot, seq, t_capture_ns=time.monotonic_ns())
            message = FrameReady(
                camera="bench", seq=seq, ring=ring_name, slot=slot, t_capture_ns=time.monotonic_ns(),
                height=HEIGHT, width=WIDTH, channels=1,
            )  # fmt: skip
            while not sender.send(message):
                time.sleep(0.0001)
    context.term()


def produce_zmq(address: str, frames: int, fps: float, high_water_mark: int) -> None:
    """Producer process: the whole frame through ZeroMQ, copy=True."""
    frame = source_frame()
    context = zmq.Context()
    with context.socket(zmq.PUSH) as push:
        push.setsockopt(zmq.SNDHWM, high_water_mark)
        push.connect(address)
        started = time.perf_counter()
        for seq in range(frames):
            pace(started, seq, fps)
            stamp(frame, seq)
            header = json.dumps({"seq": seq, "t_ns": time.monotonic_ns()}).encode()
            push.send_multipart([header, frame], copy=True)
    context.term()


def consume_ring(ring: ShmRing, receiver: Receiver, frames: int) -> tuple[list[int], list[float]]:
    """(receive times ns, latencies ms) for every frame, checking each frame's stamp."""
    times, latencies = [], []
    for seq in range(frames):
        message = receiver.receive(timeout_ms=10_000)
        assert isinstance(message, FrameReady) and message.seq == seq, f"frame {seq} missing: {message}"
        view = ring.read(message.slot, message.seq)
        assert view[0, 0] == view[-1, -1] == seq % 256
        now = time.monotonic_ns()
        ring.release(message.slot, message.seq)
        times.append(now)
        latencies.append((now - message.t_capture_ns) / 1e6)
    return times, latencies


def consume_zmq(pull: zmq.Socket, frames: int) -> tuple[list[int], list[float]]:
    times, latencies = [], []
    for seq in range(frames):
        if not pull.poll(10_000):
            msg = f"frame {seq} missing"
            raise TimeoutError(msg)
        header, data = pull.recv_multipart(copy=True)
        view = np.frombuffer(data, np.uint8).reshape(HEIGHT, WIDTH)
        fields = json.loads(header)
        assert fields["seq"] == seq and view[0, 0] == view[-1, -1] == seq % 256
        now = time.monotonic_ns()
        times.append(now)
        latencies.append((now - fields["t_ns"]) / 1e6)
    return times, latencies


def summarise(free: tuple[list[int], list[float]], paced: tuple[list[int], list[float]]) -> dict[str, float]:
    times, latencies = free[0][WARM_UP:], paced[1][WARM_UP:]
    return {
        "fps": (len(times) - 1) / ((times[-1] - times[0]) / 1e9),
        "latency_median_ms": float(np.median(latencies)),
        "latency_p99_ms": float(np.percentile(latencies, 99)),
        "free_running_latency_median_ms": float(np.median(free[1][WARM_UP:])),
    }


def run_ring(run_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    spawn = multiprocessing.get_context("spawn")
    ring_name = f"lgbench_{uuid.uuid4().hex[:8]}"
    context = zmq.Context()
    results = []
    with ShmRing.create(ring_name, slot_count=args.slots, slot_shape=(HEIGHT, WIDTH), dtype="uint8") as ring:
        for frames, fps in ((args.frames, 0.0), (args.paced_frames, args.paced_fps)):
            address = endpoint(run_dir, f"ring{fps:g}")
            with Receiver(context, address) as receiver:
                producer = spawn.Process(target=produce_ring, args=(ring_name, address, frames, fps))
                producer.start()
                results.append(consume_ring(ring, receiver, frames))
                producer.join()
    context.term()
    return summarise(*results)


def run_zmq(run_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    spawn = multiprocessing.get_context("spawn")
    context = zmq.Context()
    results = []
    for frames, fps in ((args.frames // 2, 0.0), (args.paced_frames, args.paced_fps)):
        address = endpoint(run_dir, f"zmq{fps:g}")
        with context.socket(zmq.PULL) as pull:
            pull.setsockopt(zmq.RCVHWM, args.slots)
            pull.bind(address)
            producer = spawn.Process(target=produce_zmq, args=(address, frames, fps, args.slots))
            producer.start()
            results.append(consume_zmq(pull, frames))
            producer.join()
    context.term()
    return summarise(*results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000, help="free-running frames (half as many for ZeroMQ)")
    parser.add_argument("--paced-frames", type=int, default=150)
    parser.add_argument("--paced-fps", type=float, default=50.0)
    parser.add_argument("--slots", type=int, default=8, help="ring slots; also the ZeroMQ high-water marks")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lgbench") as tmp:
        ring, copied = run_ring(Path(tmp), args), run_zmq(Path(tmp), args)
    seconds = time.perf_counter() - started
    host = f"{platform.machine()}, {multiprocessing.cpu_count()} cores, Python {platform.python_version()}"
    print(
        "| host | frame | shm ring fps | ring latency median / p99 ms | ZeroMQ copy fps | copy latency median / p99 ms | fps ratio | median latency ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {host} | {WIDTH}x{HEIGHT} Mono8 | {ring['fps']:.0f} "
        f"| {ring['latency_median_ms']:.3f} / {ring['latency_p99_ms']:.3f} | {copied['fps']:.0f} "
        f"| {copied['latency_median_ms']:.3f} / {copied['latency_p99_ms']:.3f} "
        f"| {ring['fps'] / copied['fps']:.1f}x | {copied['latency_median_ms'] / ring['latency_median_ms']:.1f}x |"
    )
    report = {"shm_ring": ring, "zeromq_copy": copied, "slots": args.slots, "paced_fps": args.paced_fps}
    print(json.dumps({**report, "bench_seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
