"""Multi-camera benchmark: 1, 2 and 4 cameras of 2448x2048 mono8 on one agent, with one model and with two.

    OMP_NUM_THREADS=2 .venv/bin/python bench/multicam_bench.py [--cameras 1,2,4] [--sources folder,gige]
        [--fps-per-camera 2] [--window-s 15] [--warmup-s 3] [--max-batch 1[,4]]

The setup is bench/agent_bench.py's (a 256x256 grey PatchCore bundle from `lineguard-train run`, its no-op
twin, 16 distinct 2448x2048 BMP frames with a centred 2048x2048 ROI). The second model is the same graph
re-signed under another model id (`brick-bench-b`): the engine serves two models, each with its own ONNX
Runtime session, batches and map ring, and routes cameras alternately to them (cam0, cam2 -> A; cam1,
cam3 -> B); the inference cost per frame is the same, so the rows show the cost of serving two models.

Sources: `folder` (the BMPs replayed at --fps-per-camera per camera) and `gige` (one Aravis fake GigE
camera per camera, 2448x2048 Mono8, frame rate set to --fps-per-camera before the agent takes control).
The fake cameras need an address each: the bench re-runs itself in a private network namespace
(`unshare -rn`), adds 127.0.0.2-5 to its loopback there, and runs the broker and agents inside it too.

Each row: one `lineguard-agent run` (engine.backend --backend, default cpu; 2 threads; max_batch --max-batch;
deadline 250 ms; on a GPU machine: --backend auto --max-batch 4 --fps-per-camera 10),
a subscriber on every camera's verdicts; --warmup-s after the first verdict are discarded, then --window-s
are measured. Per camera: verdicts/s, scored fps, failsafe %; per row: capture-to-publish p50/p99 of scored
verdicts (`latency_ms.total`), and the CPU cores used by each agent process (capture per camera, engine,
decision, rollout, supervisor) and by the fake cameras during the window. The last row runs 4 folder
cameras on the no-op bundle: the pipeline's own overhead. Prints machine, command, a Markdown table, JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent_bench import (  # the shared setup and accounting; it also puts tests/ on sys.path
    BIN,
    FRAME_H,
    FRAME_W,
    ORT_THREADS,
    ROI_SIZE,
    ROI_X,
    Setup,
    TimedSubscriber,
    command_line,
    fmt,
    machine,
    percentiles,
    prepare,
)
from broker import MosquittoBroker

from lineguard.agent.bundle import MANIFEST_FILE, SIGNATURE_FILE
from lineguard.agent.contract import Topics, Verdict
from lineguard.agent.signing import load_private_key, sign

SECOND_MODEL = "brick-bench-b"
NETNS_FLAG = "--in-private-netns"
FAKE_CAMERA = "arv-fake-gv-camera-0.8"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Variant:
    source: str  # folder | gige
    cameras: int
    models: int  # 1 or 2
    max_batch: int = 1
    noop: bool = False

    @property
    def name(self) -> str:
        engine = ", no-op engine" if self.noop else ""
        batch = f", batch {self.max_batch}" if self.max_batch > 1 else ""
        return f"{self.source}, {self.cameras} cam, {self.models} model{'s' if self.models > 1 else ''}{batch}{engine}"


@dataclass
class Run:
    variant: Variant
    window_s: float
    verdicts: list[tuple[float, Verdict]] = field(default_factory=list)
    cpu_cores: dict[str, float] = field(default_factory=dict)  # process name -> busy cores during the window


# --- a second model id, signed like any bundle ----------------------------------------------------------------


def second_model(bundle: Path, key: Path, out: Path) -> Path:
    """The bundle under model id SECOND_MODEL, re-signed: the agent serves it as a model of its own."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["model_id"] = SECOND_MODEL
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (out / MANIFEST_FILE).write_bytes(data)
    (out / SIGNATURE_FILE).write_text(json.dumps(sign(data, load_private_key(key)), indent=2) + "\n")
    return out


# --- fake GigE cameras, one address each, inside the private network namespace --------------------------------


def camera_address(index: int) -> str:
    return f"127.0.0.{index + 2}"


def start_fake_cameras(count: int, fps: float, logs: Path) -> list[subprocess.Popen[bytes]]:
    """`count` fake cameras, each on its own loopback address, at `fps` frames per second (2448x2048 Mono8)."""
    import gi

    gi.require_version("Aravis", "0.8")
    from gi.repository import Aravis, GLib

    started = []
    for index in range(count):
        address = camera_address(index)
        log = (logs / f"fake-camera-{index}.log").open("ab")
        started.append(subprocess.Popen([FAKE_CAMERA, "-i", address], stdout=log, stderr=log))
        deadline = time.monotonic() + 10
        while True:
            try:
                camera = Aravis.Camera.new(address)
                break
            except GLib.Error as error:  # until the fake camera listens
                if time.monotonic() > deadline:
                    msg = f"fake camera {address} did not come up: {error}"
                    raise RuntimeError(msg) from error
                time.sleep(0.1)
        camera.set_region(0, 0, FRAME_W, FRAME_H)
        camera.set_frame_rate(fps)
        del camera  # gives up control: the agent's capture takes it next
    return started


def stop_processes(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- CPU per process ---------------------------------------------------------------------------------------------


def process_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU-seconds so far, command line) for every live process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        table[int(entry.name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / CLK_TCK, command)
    return table


def role_of(command: str) -> str:
    """An agent process's role from its command line: `worker capture cam1` -> capture-cam1; run -> supervisor."""
    words = command.split()
    if "worker" in words:
        index = words.index("worker")
        role = words[index + 1] if index + 1 < len(words) else "?"
        camera = words[index + 2] if role == "capture" and index + 2 < len(words) else ""
        return f"{role}-{camera}" if camera else role
    if FAKE_CAMERA in command:
        return "fake-cameras"
    return "supervisor" if " run " in f"{command} " else "other"


def cpu_by_role(agent_pid: int, fake_pids: set[int]) -> dict[str, float]:
    """CPU-seconds so far of the agent's processes (by role) and the fake cameras."""
    table = process_table()
    ours, frontier = {agent_pid}, [agent_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _, _) in table.items() if ppid == parent and pid not in ours]
        ours.update(children)
        frontier.extend(children)
    totals: dict[str, float] = {}
    for pid in ours | fake_pids:
        if pid in table:
            role = role_of(table[pid][2])
            totals[role] = totals.get(role, 0.0) + table[pid][1]
    return totals


# --- one run -----------------------------------------------------------------------------------------------------


def agent_toml(setup: Setup, variant: Variant, run_dir: Path, port: int, args: argparse.Namespace) -> str:
    name = run_dir.name
    bundles = {"brick-bench": setup.bundle, SECOND_MODEL: setup.work / "second-bundle"}
    lines = [
        f'agent_id = "{name}"',
        'line = "line-1"',
        f'run_dir = "{run_dir}/run"',
        f'state_dir = "{run_dir}/state"',
    ]
    if variant.models == 2:
        lines += [f'[[models]]\nid = "{model}"\nbundle = "{bundle}"' for model, bundle in bundles.items()]
    for index in range(variant.cameras):
        camera = [f'[[cameras]]\nname = "cam{index}"', 'pixel_format = "mono8"']
        if variant.models == 2:
            camera.append(f'model = "{list(bundles)[index % 2]}"')
        if variant.source == "folder":
            camera += ['source = "folder"', f'address = "{setup.frames}"', f"fps = {args.fps_per_camera}"]
            camera.append("loop = true")
        else:
            camera += ['source = "gige"', f'address = "{camera_address(index)}"', f"width_px = {FRAME_W}"]
            camera += [f"height_px = {FRAME_H}", f"expected_fps = {args.fps_per_camera}"]
        camera.append(f"[cameras.roi]\nx = {ROI_X}\ny = 0\nwidth = {ROI_SIZE}\nheight = {ROI_SIZE}")
        lines += camera
    bundle = setup.noop_bundle if variant.noop else setup.bundle
    lines += [
        f'[engine]\nbundle = "{bundle}"\ntrusted_keys = ["{setup.public_key}"]\nbackend = "{args.backend}"',
        f"threads = {ORT_THREADS}\nmax_batch = {variant.max_batch}",
        '[decision]\ndeadline_ms = 250\nheatmap = "none"',
        f'[mqtt]\nport = {port}\ntopic_prefix = "{name}"',
        "[metrics]\nport = 0",
        "[samples]\nenabled = false",
    ]
    return "\n".join(lines) + "\n"


def run_variant(setup: Setup, broker: MosquittoBroker, variant: Variant, args: argparse.Namespace) -> Run:
    slug = (
        f"{variant.source}-{variant.cameras}c-{variant.models}m-b{variant.max_batch}{'-noop' if variant.noop else ''}"
    )
    run_dir = setup.work / f"mc-{os.getpid()}-{slug}"
    run_dir.mkdir()
    config = run_dir / "agent.toml"
    config.write_text(agent_toml(setup, variant, run_dir, broker.port, args))
    fakes = start_fake_cameras(variant.cameras, args.fps_per_camera, run_dir) if variant.source == "gige" else []
    subscriber = TimedSubscriber(broker, Topics(run_dir.name).verdict("line-1", run_dir.name, "+"))
    log = (run_dir / "agent.log").open("wb")
    agent = subprocess.Popen([str(BIN / "lineguard-agent"), "run", "--config", str(config)], stderr=log)
    run = Run(variant, args.window_s)
    try:
        wait_until_serving(run_dir / "agent.log", subscriber, variant, agent)
        time.sleep(args.warmup_s)
        fake_pids = {process.pid for process in fakes}
        start, before, t0 = time.time(), cpu_by_role(agent.pid, fake_pids), time.monotonic()
        time.sleep(args.window_s)
        after, elapsed = cpu_by_role(agent.pid, fake_pids), time.monotonic() - t0
        run.verdicts = subscriber.between(start, time.time())
        run.cpu_cores = {role: round((after[role] - before.get(role, 0.0)) / elapsed, 3) for role in sorted(after)}
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        log.close()
        subscriber.close()
        stop_processes(fakes)
    return run


def wait_until_serving(log: Path, subscriber: TimedSubscriber, variant: Variant, agent: subprocess.Popen) -> None:
    """Until the supervisor says every process runs and every camera has had a scored verdict: start-up (model
    loading, imports on a loaded machine) must not count in the window."""
    cameras = {f"cam{index}" for index in range(variant.cameras)}

    def scored_cameras() -> set[str]:
        return {v.camera for _, v in subscriber.between(0, time.time()) if v.verdict != "failsafe"}

    def serving() -> bool:
        return "pipeline ready" in log.read_text(errors="replace") and scored_cameras() >= cameras

    if not subscriber.wait_until(lambda: serving() or agent.poll() is not None, 180) or agent.poll() is not None:
        tail = log.read_text(errors="replace")[-3000:]
        msg = f"{variant.name}: not every camera scored within 180 s; agent log tail:\n{tail}"
        raise RuntimeError(msg)


# --- summaries -----------------------------------------------------------------------------------------------


def summarise(run: Run) -> dict[str, Any]:
    cameras: dict[str, dict[str, Any]] = {}
    for camera in sorted({v.camera for _, v in run.verdicts}):
        mine = [v for _, v in run.verdicts if v.camera == camera]
        scored = [v for v in mine if v.verdict != "failsafe"]
        cameras[camera] = {
            "model": sorted({v.model for v in scored}),
            "verdicts_per_s": round(len(mine) / run.window_s, 2),
            "scored_fps": round(len(scored) / run.window_s, 2),
            "failsafe_pct": round(100 * (len(mine) - len(scored)) / len(mine), 1) if mine else None,
            "total_ms": percentiles([v.latency_ms.total for v in scored]),
        }
    scored_all = [v for _, v in run.verdicts if v.verdict != "failsafe"]
    causes: dict[str, int] = {}
    reasons: dict[str, str] = {}  # cause -> the first reason given, for reading the table
    for _, verdict in run.verdicts:
        if verdict.cause is not None:
            causes[verdict.cause] = causes.get(verdict.cause, 0) + 1
            reasons.setdefault(verdict.cause, verdict.reason[:120])
    return {
        "variant": run.variant.name,
        "window_s": run.window_s,
        "verdicts": len(run.verdicts),
        "failsafe_pct": round(100 * (len(run.verdicts) - len(scored_all)) / len(run.verdicts), 1)
        if run.verdicts
        else None,
        "failsafe_causes": causes,
        "failsafe_reasons": reasons,
        "total_ms": percentiles([v.latency_ms.total for v in scored_all]),
        "cameras": cameras,
        "cpu_cores": run.cpu_cores,
    }


def cpu_text(cores: dict[str, float]) -> str:
    """`engine 0.91, decision 0.08, capture 4x 0.05 (0.20), ...`: capture processes summed with their count."""
    captures = [value for role, value in cores.items() if role.startswith("capture")]
    parts = [
        f"{role} {value:.2f}" for role, value in cores.items() if not role.startswith("capture") and value >= 0.005
    ]
    if captures:
        parts.insert(0, f"capture {len(captures)}x {sum(captures):.2f}")
    return ", ".join(parts)


def p99_ratio(row: dict[str, Any], p99s: dict[str, float | None]) -> str:
    """A batch-N row against the same row at batch 1; any other row against 1 camera, 1 model of its source."""
    name, p99 = row["variant"], row["total_ms"]["p99"]
    if ", batch " in name:
        base, against = p99s.get(re.sub(r", batch [0-9]+", "", name)), "batch 1"
    elif "no-op" not in name:
        base, against = p99s.get(f"{name.split(',')[0]}, 1 cam, 1 model"), "1 camera"
    else:
        return ""
    return f"{p99 / base:.2f}x vs {against}" if base and p99 else ""


def markdown_table(rows: list[dict[str, Any]], fps: float) -> str:
    lines = [
        "| variant | offered fps per camera | delivered fps per camera | failsafe % (worst camera) "
        "| p50 ms | p99 ms | p99 ratio | CPU cores per process |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    p99s = {row["variant"]: row["total_ms"]["p99"] for row in rows}
    for row in rows:
        delivered = " / ".join(fmt(camera["scored_fps"]) for camera in row["cameras"].values())
        worst = max((camera["failsafe_pct"] or 0.0 for camera in row["cameras"].values()), default=None)
        lines.append(
            f"| {row['variant']} | {fps:g} | {delivered} | {fmt(row['failsafe_pct'])} ({fmt(worst)}) "
            f"| {fmt(row['total_ms']['p50'])} | {fmt(row['total_ms']['p99'])} | {p99_ratio(row, p99s)} "
            f"| {cpu_text(row['cpu_cores'])} |"
        )
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", default="1,2,4", help="camera counts (default 1,2,4)")
    parser.add_argument("--sources", default="folder,gige", help="folder, gige or both (default both)")
    parser.add_argument("--fps-per-camera", type=float, default=2.0, help="frames per second per camera (default 2)")
    parser.add_argument("--window-s", type=float, default=15.0, help="measured seconds per run (default 15)")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="seconds discarded after the first verdict")
    parser.add_argument(
        "--max-batch", default="1", help="engine.max_batch values, each a row (default 1, the CPU default; e.g. 1,4)"
    )
    parser.add_argument(
        "--backend", default="cpu", choices=("auto", "tensorrt", "cuda", "cpu"), help="engine.backend (default cpu)"
    )
    parser.add_argument("--no-noop", action="store_true", help="skip the no-op engine row")
    parser.add_argument(NETNS_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cameras = [int(count) for count in args.cameras.split(",") if count.strip()]
    args.sources = [source.strip() for source in args.sources.split(",") if source.strip()]
    args.max_batch = [int(size) for size in args.max_batch.split(",") if size.strip()]
    return args


def enter_private_netns() -> None:
    """Re-run this bench in a private network namespace where the fake cameras can have an address each."""
    if shutil.which("unshare") is None or shutil.which(FAKE_CAMERA) is None:
        msg = f"the gige rows need `unshare` and {FAKE_CAMERA}; run with --sources folder"
        raise SystemExit(msg)
    os.execvp("unshare", ["unshare", "-rn", sys.executable, *sys.argv, NETNS_FLAG])


def set_up_loopback(count: int) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for index in range(count):
        subprocess.run(["ip", "addr", "add", f"{camera_address(index)}/8", "dev", "lo"], check=True)


def plan(args: argparse.Namespace) -> list[Variant]:
    variants = [
        Variant(source, count, models, batch)
        for source in args.sources
        for count in args.cameras
        for models in (1, 2)
        for batch in args.max_batch  # innermost: the batch sizes of one setting run side by side
        if models <= count
    ]
    if not args.no_noop:
        variants.append(Variant("folder", max(args.cameras), 1, noop=True))
    return variants


def main() -> None:
    args = parse_args()
    if "gige" in args.sources and not args.in_private_netns:
        enter_private_netns()
    if args.in_private_netns:
        set_up_loopback(max(args.cameras))
    started = time.monotonic()
    host = machine()
    print(f"machine: {host}\ncommand: {command_line().replace(' ' + NETNS_FLAG, '')}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lg-multicam-bench-") as tmp:
        setup = prepare(Path(tmp))
        second_model(setup.bundle, Path(tmp) / "keys" / "trainer.pem", setup.work / "second-bundle")
        print(f"setup done in {time.monotonic() - started:.0f} s", file=sys.stderr)
        with MosquittoBroker(Path(tmp) / "broker") as broker:
            for variant in plan(args):
                run_started = time.monotonic()
                rows.append(summarise(run_variant(setup, broker, variant, args)))
                row = rows[-1]
                print(
                    f"  {row['variant']}: p99 {row['total_ms']['p99']} ms, failsafe {row['failsafe_pct']} % "
                    f"({time.monotonic() - run_started:.0f} s)",
                    file=sys.stderr,
                )
    host["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print("\n" + markdown_table(rows, args.fps_per_camera) + "\n")
    report = {"machine": host, "command": command_line(), "runs": rows}
    print(json.dumps({**report, "bench_seconds": round(time.monotonic() - started, 1)}, indent=1))


if __name__ == "__main__":
    main()
