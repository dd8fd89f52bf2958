"""Agent benchmark: sustained fps and capture-to-publish latency of the whole agent, against a naive loop.

    OMP_NUM_THREADS=2 .venv/bin/python bench/agent_bench.py [--loads 5,10,20,30,max] [--window-s 15] [--warmup-s 2]

Everything is built in a temp dir by the real tools: sample data, a key, and a 256x256 grey PatchCore bundle
from `lineguard-train run`; 16 distinct 2448x2048 mono8 frames as uncompressed .bmp (the model's 256x256 image
scaled into a centred 2048x2048 ROI at x=200), replayed by the agent's `folder` source with loop = true.

Variants, each on one local Mosquitto, each at every offered load (fps; "max" = as fast as the source reads):
- pipeline: `lineguard-agent run` (capture -> shm ring + ZeroMQ -> engine (ORT CPU, 2 threads, default batching: max_batch 1)
  -> decision -> MQTT QoS 1). Latency is the verdict's own `latency_ms.total` (capture -> handed to MQTT).
- naive: one process that reads the .bmp, crops/resizes (INTER_AREA), runs the same model.onnx (ORT CPU,
  2 threads, batch 1), thresholds and publishes the same JSON (paho, QoS 1), frame after frame. Frame i is due
  at t0 + i/fps; like the agent's folder source it is stamped when its read is done, so latency = publish -
  (due + read time): queueing behind a slow loop counts, the transfer itself does not. At "max" it free-runs
  (a frame is due when the loop is ready for it), as the agent's replay clock does.
- pipeline, no-op engine: the same agent on a bundle whose graph returns score 0 and a zero map, so total
  latency is the pipeline's own overhead: slot copy, ring + ZeroMQ, the engine's batch wait and crop/resize,
  decision, publish (the crop/resize the naive loop pays too; it is measured alone and printed).
A subscriber records every verdict; the first --warmup-s after the first verdict are discarded, then verdicts
arriving during --window-s are counted. The machine is shared, so each window also records the CPU cores busy
with this bench's processes and with everything else. Prints the machine, the command, a Markdown table
(with per-stage latencies and failsafe reasons) and the JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from broker import MosquittoBroker
from mqtt_subscriber import Subscriber

from lineguard.agent.bundle import MANIFEST_FILE, SIGNATURE_FILE, file_sha256
from lineguard.agent.contract import Latency, Topics, Verdict, decode
from lineguard.agent.signing import load_private_key, public_key_path, sign

FRAME_H, FRAME_W = 2048, 2448
ROI_X, ROI_SIZE = 200, 2048
MODEL_SIZE = 256
N_FRAMES = 16
MAX_FPS = 1000.0  # "max": the folder source replays as fast as it can read
ORT_THREADS = 2
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Setup:
    """What every run shares: the replay folder, the two bundles, the trust key and the calibrated threshold."""

    work: Path
    frames: Path
    bundle: Path
    noop_bundle: Path
    public_key: Path
    threshold: float


@dataclass
class Run:
    """One (variant, load) run: the verdict payloads that arrived during the window, with arrival wall times."""

    variant: str
    load: str
    window_s: float
    verdicts: list[tuple[float, Verdict]] = field(default_factory=list)
    cpu_cores: dict[str, float] = field(default_factory=dict)  # busy cores during the window: ours, others'


class TimedSubscriber(Subscriber):
    """The tests' subscriber, also keeping each message's arrival wall time (for the window and a cross-check)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.arrivals: list[tuple[float, bytes]] = []
        super().__init__(*args, **kwargs)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self.arrivals.append((time.time(), message.payload))
        super()._on_message(client, userdata, message)

    def between(self, start: float, end: float) -> list[tuple[float, Verdict]]:
        with self._cond:
            return [(t, decode(Verdict, p)) for t, p in self.arrivals if start <= t < end]


# --- setup: a real bundle from the trainer, a no-op twin, and the frames -------------------------------------


def train_tool(*args: str | Path) -> None:
    """Run `lineguard-train ARGS`; on failure raise with its stderr tail (the CLI says what to fix)."""
    done = subprocess.run([BIN / "lineguard-train", *map(str, args)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        msg = f"lineguard-train {args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}"
        raise RuntimeError(msg)


def train_bundle(work: Path) -> tuple[Path, Path]:
    """(bundle dir, private key) made by the real CLI, so the model is exactly what a user would deploy."""
    key, data, out = work / "keys" / "trainer.pem", work / "data", work / "out"
    train_tool("make-sample-data", data, "--categories", "brick", "--train", "16")
    train_tool("keygen", key)
    train_tool(
        "run", data / "brick", "--out", out, "--sign-key", key, "--bank-size", "4096", "--model-id", "brick-bench"
    )
    return out / "bundle", key


def write_frames(test_dir: Path, out: Path) -> Path:
    """N_FRAMES camera-sized .bmp frames from test images spread over good and defect classes.

    The 256x256 sample is scaled up into the ROI, so after the agent's crop and INTER_AREA resize the model
    sees (nearly) the image it was calibrated on: verdicts are realistic accepts and rejects."""
    out.mkdir(parents=True)
    paths = sorted(test_dir.glob("*/*.png"))
    picks = np.linspace(0, len(paths) - 1, N_FRAMES).round().astype(int)
    for order, index in enumerate(picks):
        image = cv2.imread(str(paths[index]), cv2.IMREAD_GRAYSCALE)
        square = cv2.resize(image, (ROI_SIZE, ROI_SIZE), interpolation=cv2.INTER_CUBIC)
        right = FRAME_W - ROI_X - ROI_SIZE
        frame = cv2.copyMakeBorder(square, 0, FRAME_H - ROI_SIZE, ROI_X, right, cv2.BORDER_REFLECT)
        cv2.imwrite(str(out / f"{order:02d}.bmp"), frame)
    return out


def noop_graph() -> bytes:
    """ONNX graph with the bundle contract: image (N,256,256,1) uint8 -> score (N) = 0, anomaly_map (N,256,256) = 0.

    It still reads the whole input (Cast, ReduceMin), so a batch is really fed through ONNX Runtime."""
    import onnx
    from onnx import TensorProto, helper

    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    channel_axis = helper.make_tensor("channel_axis", TensorProto.INT64, [1], [3])
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMin", ["pixels"], ["lowest"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", ["lowest", "zero"], ["score"]),
        helper.make_node("Squeeze", ["pixels", "channel_axis"], ["plane"]),
        helper.make_node("Mul", ["plane", "zero"], ["anomaly_map"]),
    ]
    size = [MODEL_SIZE, MODEL_SIZE]
    graph = helper.make_graph(
        nodes,
        "lineguard-noop",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["n", *size, 1])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["n", *size]),
        ],
        initializer=[zero, channel_axis],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_noop_bundle(bundle: Path, key: Path, out: Path) -> Path:
    """A copy of the real bundle with the no-op graph, golden scores 0, fresh digests and a fresh signature.

    The agent cannot tell it from any other bundle: the same verification, canary and serving paths run."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    (out / manifest["model"]["onnx_file"]).write_bytes(noop_graph())
    manifest["model_id"] += "-noop"
    for golden in manifest["golden"]:
        golden["expected_score"] = 0.0
    manifest["files"] = {name: file_sha256(out / name) for name in manifest["files"]}
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (out / MANIFEST_FILE).write_bytes(manifest_bytes)
    record = sign(manifest_bytes, load_private_key(key))
    (out / SIGNATURE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def prepare(work: Path) -> Setup:
    bundle, key = train_bundle(work)
    frames = write_frames(work / "data" / "brick" / "test", work / "frames")
    noop = make_noop_bundle(bundle, key, work / "noop-bundle")
    threshold = json.loads((bundle / MANIFEST_FILE).read_text())["threshold"]["value"]
    return Setup(work, frames, bundle, noop, public_key_path(key), float(threshold))


# --- CPU accounting: the machine is shared, so say how busy it was with other work during each window -------


def machine_busy_s() -> float:
    """CPU-seconds the whole machine spent busy since boot (all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root: int) -> float:
    """CPU-seconds used so far by `root` and its live descendants (agent processes, naive child, Mosquitto)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK"))
    ours, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in ours]
        ours.update(children)
        frontier.extend(children)
    return sum(stats[pid][1] for pid in ours if pid in stats)


def cpu_snapshot() -> tuple[float, float, float]:
    return time.monotonic(), machine_busy_s(), tree_cpu_s(os.getpid())


def busy_cores(before: tuple[float, float, float], after: tuple[float, float, float]) -> dict[str, float]:
    elapsed = after[0] - before[0]
    ours = (after[2] - before[2]) / elapsed
    return {"ours": round(ours, 2), "others": round(max(0.0, (after[1] - before[1]) / elapsed - ours), 2)}


# --- the pipeline: `lineguard-agent run` ---------------------------------------------------------------------


AGENT_TOML = """\
agent_id = "{name}"
line = "line-1"
run_dir = "{run_dir}/run"
state_dir = "{run_dir}/state"

[[cameras]]
name = "cam0"
source = "folder"
address = "{frames}"
pixel_format = "mono8"
fps = {fps}
loop = true
[cameras.roi]
x = {roi_x}
y = 0
width = {roi_size}
height = {roi_size}

[engine]
bundle = "{bundle}"
trusted_keys = ["{public_key}"]
backend = "cpu"
threads = {threads}

[decision]
deadline_ms = 250
heatmap = "none"

[mqtt]
port = {port}
topic_prefix = "{name}"

[metrics]
port = 0
"""


def agent_config(setup: Setup, run_dir: Path, broker: MosquittoBroker, bundle: Path, fps: float) -> Path:
    """agent.toml as a user would write it for this camera; a unique agent id and topic prefix per run."""
    config = run_dir / "agent.toml"
    fields = {"name": run_dir.name, "run_dir": run_dir, "frames": setup.frames, "fps": fps, "bundle": bundle}
    fields |= {"roi_x": ROI_X, "roi_size": ROI_SIZE, "public_key": setup.public_key, "threads": ORT_THREADS}
    config.write_text(AGENT_TOML.format(**fields, port=broker.port))
    return config


def collect(subscriber: TimedSubscriber, run: Run, warmup_s: float, alive: Any) -> None:
    """Wait for the first verdict, skip the warm-up, then keep what arrives during the window."""
    if not subscriber.wait_until(lambda: bool(subscriber.arrivals), 120) or not alive():
        msg = f"{run.variant} at {run.load} fps produced no verdict within 120 s"
        raise RuntimeError(msg)
    time.sleep(warmup_s)
    start, before = time.time(), cpu_snapshot()
    time.sleep(run.window_s)
    run.verdicts = subscriber.between(start, time.time())
    run.cpu_cores = busy_cores(before, cpu_snapshot())


def run_pipeline(setup: Setup, broker: MosquittoBroker, variant: str, load: str, args: argparse.Namespace) -> Run:
    """One agent run at one offered load; stopped with SIGTERM like systemd would."""
    slug = "noop" if "no-op" in variant else "full"
    run_dir = setup.work / f"lgbench-{os.getpid()}-{slug}-{load}"
    run_dir.mkdir()
    bundle = setup.noop_bundle if "no-op" in variant else setup.bundle
    fps = MAX_FPS if load == "max" else float(load)
    config = agent_config(setup, run_dir, broker, bundle, fps)
    subscriber = TimedSubscriber(broker, Topics(run_dir.name).verdict("line-1", run_dir.name, "cam0"))
    log = (run_dir / "agent.log").open("wb")
    agent = subprocess.Popen([str(BIN / "lineguard-agent"), "run", "--config", str(config)], stderr=log)
    run = Run(variant, load, args.window_s)
    try:
        collect(subscriber, run, args.warmup_s, lambda: agent.poll() is None)
    except RuntimeError as error:
        tail = (run_dir / "agent.log").read_text(errors="replace")[-3000:]
        msg = f"{error}\nagent log tail:\n{tail}"
        raise RuntimeError(msg) from error
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        log.close()
        subscriber.close()
    return run


# --- the naive loop: read, infer, publish in one process ------------------------------------------------------


@dataclass(frozen=True)
class NaiveJob:
    """Everything the naive child process needs (picklable for the spawn start method)."""

    frames: Path
    onnx_path: Path
    threshold: float
    host: str
    port: int
    topic: str
    fps: float | None  # None: free-running


def open_session(onnx_path: Path) -> Any:
    """ORT on the CPU with the agent's settings (2 intra-op threads), warmed up once like the engine does."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = ORT_THREADS
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    session.run(["score", "anomaly_map"], {"image": np.zeros((1, MODEL_SIZE, MODEL_SIZE, 1), np.uint8)})
    return session


def open_mqtt(host: str, port: int) -> Any:
    """A plain paho MQTT 5 client with its network thread running, as a simple integration would use."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"naive-{os.getpid()}", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.connect(host, port)
    client.loop_start()
    deadline = time.monotonic() + 10
    while not client.is_connected() and time.monotonic() < deadline:
        time.sleep(0.01)
    return client


def naive_frame(job: NaiveJob, session: Any, path: Path, due: float, seq: int) -> Verdict:
    """Read, crop/resize, infer, threshold and publish-ready one frame, as a simple loop would."""
    started = time.monotonic()
    frame = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    read_s = time.monotonic() - started
    captured = (due if job.fps is not None else started) + read_s  # stamped after the read, like the agent
    image = np.empty((1, MODEL_SIZE, MODEL_SIZE, 1), np.uint8)
    roi = frame[:ROI_SIZE, ROI_X : ROI_X + ROI_SIZE]
    cv2.resize(roi, (MODEL_SIZE, MODEL_SIZE), dst=image[0, :, :, 0], interpolation=cv2.INTER_AREA)
    infer_start = time.monotonic()
    scores, _maps = session.run(["score", "anomaly_map"], {"image": image})
    score = float(scores[0])
    verdict = "reject" if score >= job.threshold else "accept"
    done = time.monotonic()
    return Verdict(
        agent_id="naive",
        line="line-1",
        camera="naive",
        seq=seq,
        capture_ts=captured + time.time() - time.monotonic(),
        decided_ts=time.time(),
        verdict=verdict,
        reason=f"score {score:.4g} {'>=' if verdict == 'reject' else '<'} threshold {job.threshold:.4g}",
        score=score,
        threshold=job.threshold,
        model="naive@1",
        latency_ms=Latency(
            capture_to_engine=round((infer_start - captured) * 1e3, 3),
            inference=round((done - infer_start) * 1e3, 3),
            total=round((done - captured) * 1e3, 3),
        ),
    )


def naive_main(job: NaiveJob, ready: Any, stop: Any) -> None:
    """The naive child process: frame i is due at t0 + i/fps; it waits when early and never skips a frame."""
    session = open_session(job.onnx_path)
    client = open_mqtt(job.host, job.port)
    paths = sorted(job.frames.glob("*.bmp"))
    ready.set()
    t0 = time.monotonic()
    seq = 0
    while not stop.is_set():
        due = t0 + seq / job.fps if job.fps is not None else time.monotonic()
        if stop.wait(max(0.0, due - time.monotonic())):
            break
        seq += 1
        verdict = naive_frame(job, session, paths[(seq - 1) % len(paths)], due, seq)
        client.publish(job.topic, verdict.encode(), qos=1)
    client.disconnect()
    client.loop_stop()


def run_naive(setup: Setup, broker: MosquittoBroker, load: str, args: argparse.Namespace) -> Run:
    """One naive run at one offered load, in a spawned child so this process only subscribes."""
    topic = Topics(f"lgbench-{os.getpid()}-naive-{load}").verdict("line-1", "naive", "naive")
    fps = None if load == "max" else float(load)
    job = NaiveJob(setup.frames, setup.bundle / "model.onnx", setup.threshold, broker.host, broker.port, topic, fps)
    spawn = multiprocessing.get_context("spawn")
    ready, stop = spawn.Event(), spawn.Event()
    subscriber = TimedSubscriber(broker, topic)
    child = spawn.Process(target=naive_main, args=(job, ready, stop), name="naive-loop")
    child.start()
    run = Run("naive", load, args.window_s)
    try:
        if not ready.wait(120):
            msg = "the naive loop did not start within 120 s"
            raise RuntimeError(msg)
        collect(subscriber, run, args.warmup_s, child.is_alive)
    finally:
        stop.set()
        child.join(30)
        if child.is_alive():
            child.terminate()
            child.join()
        subscriber.close()
    return run


# --- summaries and output -----------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": round(float(np.percentile(values, 50)), 3), "p99": round(float(np.percentile(values, 99)), 3)}


def summarise(run: Run) -> dict[str, Any]:
    """Rates over the window; latency of scored (non-failsafe) verdicts, their stages, and subscriber-side latency."""
    scored = [(t, v) for t, v in run.verdicts if v.verdict != "failsafe"]
    failsafe = len(run.verdicts) - len(scored)
    stage_ms = [(t, v.latency_ms.model_dump(exclude_none=True)) for t, v in scored]
    stages = sorted({stage for _, each in stage_ms for stage in each} - {"total"})
    causes = sorted({f"{v.cause}: {v.reason.split(':')[0][:60]}" for _, v in run.verdicts if v.verdict == "failsafe"})
    return {
        "variant": run.variant,
        "offered_fps": run.load,
        "window_s": run.window_s,
        "verdicts": len(run.verdicts),
        "verdicts_per_s": round(len(run.verdicts) / run.window_s, 2),
        "delivered_fps": round(len(scored) / run.window_s, 2),
        "failsafe_pct": round(100 * failsafe / len(run.verdicts), 2) if run.verdicts else None,
        "failsafe_reasons": causes,
        "cpu_cores": run.cpu_cores,
        "rejects": sum(v.verdict == "reject" for _, v in scored),
        "total_ms": percentiles([v.latency_ms.total for _, v in scored]),
        "at_subscriber_ms": percentiles([(t - v.capture_ts) * 1e3 for t, v in scored]),
        "stages_ms": {stage: percentiles([each[stage] for _, each in stage_ms if stage in each]) for stage in stages},
    }


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per (variant, load); the ratio naive p99 / pipeline p99 sits on the pipeline's row."""
    naive_p99 = {row["offered_fps"]: row["total_ms"]["p99"] for row in rows if row["variant"] == "naive"}
    lines = [
        "| variant | offered fps | delivered fps | verdicts/s (all) | failsafe % | p50 ms | p99 ms "
        "| p99 at subscriber ms | naive p99 / pipeline p99 | CPU cores ours / others |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        p99, naive = row["total_ms"]["p99"], naive_p99.get(row["offered_fps"])
        ratio = f"{naive / p99:.2f}x" if row["variant"] == "pipeline" and naive and p99 else ""
        lines.append(
            f"| {row['variant']} | {row['offered_fps']} | {fmt(row['delivered_fps'])} | {fmt(row['verdicts_per_s'])} "
            f"| {fmt(row['failsafe_pct'])} | {fmt(row['total_ms']['p50'])} | {fmt(p99)} "
            f"| {fmt(row['at_subscriber_ms']['p99'])} | {ratio} "
            f"| {fmt(row['cpu_cores'].get('ours'), 2)} / {fmt(row['cpu_cores'].get('others'), 2)} |"
        )
    return "\n".join(lines)


def stage_table(rows: list[dict[str, Any]]) -> str:
    """Per-stage p50 / p99 of each run, to show where the time goes."""
    lines = ["| variant | offered fps | stage p50 / p99 ms | failsafe reasons |", "| --- | --- | --- | --- |"]
    for row in rows:
        stages = ", ".join(f"{name} {fmt(v['p50'])} / {fmt(v['p99'])}" for name, v in row["stages_ms"].items())
        reasons = "; ".join(row["failsafe_reasons"])
        lines.append(f"| {row['variant']} | {row['offered_fps']} | {stages} | {reasons} |")
    return "\n".join(lines)


def fixed_costs(frames: Path) -> dict[str, float]:
    """Median ms of two fixed per-frame costs inside the pipeline's total, for reading the no-op overhead:
    the 5 MB copy of a decoded frame into its ring slot (a camera's DMA would do it for free) and the ROI
    crop + INTER_AREA resize the engine (and the naive loop) do before inference."""
    frame = cv2.imread(str(sorted(frames.glob("*.bmp"))[0]), cv2.IMREAD_GRAYSCALE)
    slot = np.empty((FRAME_H, FRAME_W, 1), np.uint8)
    image = np.empty((MODEL_SIZE, MODEL_SIZE), np.uint8)
    copy, resize = [], []
    for _ in range(20):
        started = time.perf_counter()
        slot[:, :, 0] = frame
        copied = time.perf_counter()
        roi = slot[:ROI_SIZE, ROI_X : ROI_X + ROI_SIZE, 0]
        cv2.resize(roi, (MODEL_SIZE, MODEL_SIZE), dst=image, interpolation=cv2.INTER_AREA)
        copy.append((copied - started) * 1e3)
        resize.append((time.perf_counter() - copied) * 1e3)
    return {"slot_copy_ms": round(float(np.median(copy)), 2), "crop_resize_ms": round(float(np.median(resize)), 2)}


def ort_batch_costs(onnx_path: Path) -> dict[str, float]:
    """ORT CPU ms per image at batch 1 and 4 on a zero frame (median of 5): context for the engine's batching."""
    session = open_session(onnx_path)
    costs = {}
    for batch in (1, 4):
        frames = np.zeros((batch, MODEL_SIZE, MODEL_SIZE, 1), np.uint8)
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            session.run(["score", "anomaly_map"], {"image": frames})
            samples.append((time.perf_counter() - started) * 1e3 / batch)
        costs[f"batch_{batch}_ms_per_image"] = round(float(np.median(samples)), 2)
    return costs


def machine() -> dict[str, Any]:
    import onnxruntime

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def command_line() -> str:
    prefix = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return prefix + shlex.join([os.path.relpath(sys.executable), *sys.argv])


def progress(row: dict[str, Any], seconds: float) -> None:
    """One line per finished run on stderr, so a long bench shows it is alive."""
    print(
        f"  {row['variant']} at {row['offered_fps']}: {row['delivered_fps']} fps scored, "
        f"p99 {row['total_ms']['p99']} ms, failsafe {row['failsafe_pct']} % ({seconds:.0f} s)",
        file=sys.stderr,
    )


def run_all(setup: Setup, broker: MosquittoBroker, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Pipeline and naive side by side at each load (interleaved, so a drifting machine hits both), then no-op."""
    plan = [(variant, load) for load in args.loads for variant in ("pipeline", "naive")]
    plan += [("pipeline no-op engine", load) for load in args.noop_loads]
    rows = []
    for variant, load in plan:
        started = time.monotonic()
        if variant == "naive":
            run = run_naive(setup, broker, load, args)
        else:
            run = run_pipeline(setup, broker, variant, load, args)
        rows.append(summarise(run))
        progress(rows[-1], time.monotonic() - started)
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", default="5,10,20,30,max", help="offered loads: fps or max (default 5,10,20,30,max)")
    parser.add_argument("--noop-loads", default="20,max", help="loads for the no-op engine (default 20,max)")
    parser.add_argument("--window-s", type=float, default=15.0, help="measured seconds per run (default 15)")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="seconds discarded after the first verdict")
    args = parser.parse_args()
    args.loads = [load.strip() for load in args.loads.split(",") if load.strip()]
    args.noop_loads = [load.strip() for load in args.noop_loads.split(",") if load.strip()]
    return args


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    host = machine()
    print(f"machine: {host}\ncommand: {command_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lg-agent-bench-") as tmp:
        setup = prepare(Path(tmp))
        print(f"setup done in {time.monotonic() - started:.0f} s; threshold {setup.threshold:.3f}", file=sys.stderr)
        costs = {**ort_batch_costs(setup.bundle / "model.onnx"), **fixed_costs(setup.frames)}
        with MosquittoBroker(Path(tmp) / "broker") as broker:
            rows = run_all(setup, broker, args)
    host["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print("\n" + markdown_table(rows) + "\n\n" + stage_table(rows) + "\n")
    print(f"per-frame costs measured alone: {costs}; bench wall time {time.monotonic() - started:.0f} s\n")
    report = {"machine": host, "command": command_line(), "costs_alone": costs, "runs": rows}
    print(json.dumps({**report, "bench_seconds": round(time.monotonic() - started, 1)}, indent=1))


if __name__ == "__main__":
    main()
