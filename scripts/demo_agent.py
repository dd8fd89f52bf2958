"""Demo, second half: run the agent on replayed sample images with a local Mosquitto and watch its verdicts.

    .venv/bin/python scripts/demo_agent.py --out demo-out --category brick

Expects `./run demo`'s first half: demo-out/data/<category> (sample data), demo-out/<category>/bundle
(a signed bundle) and demo-out/keys/trainer.pub. Starts a throwaway broker on a free loopback port,
`lineguard-agent run` on the category's test images, the line dashboard (scripts/demo_ui.py; it prints
its URL), `lineguard-agent watch` until every frame has its verdict, and a reject gate
(scripts/demo_actuator.py: lineguard-actuator on a simulated Modbus I/O block) that prints a line per
pulse; then the sample store's loop (scripts/demo_samples.py: a line out of focus, its samples labelled,
exported, retrained on, compared and pushed); then stops them all.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from demo_actuator import DemoGate
from demo_ui import DemoDashboard


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_broker(folder: Path, port: int) -> subprocess.Popen:
    """Mosquitto on 127.0.0.1:port; max_queued_messages raised so QoS 1 verdicts are never dropped."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\nmax_queued_messages 100000\n"
    )
    broker = subprocess.Popen(["mosquitto", "-c", str(config)], stderr=(folder / "mosquitto.log").open("wb"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return broker
        time.sleep(0.02)
    broker.kill()
    sys.exit(f"mosquitto did not start; see {folder / 'mosquitto.log'}")


def replay_folder(data: Path, folder: Path) -> int:
    """The category's test images in one folder (good and defect interleaved by name); returns the count."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    images = sorted((data / "test").glob("*/*.png"))
    for image in images:
        shutil.copyfile(image, folder / f"{image.stem}_{image.parent.name}.png")
    return len(images)


def write_config(out: Path, category: str, port: int, replay: Path) -> Path:
    config = out / "agent.toml"
    config.write_text(
        f"""agent_id = "demo"
line = "demo-line"
run_dir = "{(out / "run").absolute()}"
state_dir = "{(out / "state").absolute()}"

[[cameras]]
name = "{category}"
source = "folder"
address = "{replay.absolute()}"
pixel_format = "mono8"
fps = 10

[engine]
bundle = "{(out / category / "bundle").absolute()}"
trusted_keys = ["{(out / "keys" / "trainer.pub").absolute()}"]

[mqtt]
port = {port}

[metrics]
port = 0
"""
    )
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--category", default="brick")
    args = parser.parse_args()
    port = free_port()
    broker = start_broker(args.out / "broker", port)
    dashboard = DemoDashboard.start(args.out, port)
    frames = replay_folder(args.out / "data" / args.category, args.out / "replay")
    config = write_config(args.out, args.category, port, args.out / "replay")
    bin_dir = Path(sys.executable).parent
    agent = subprocess.Popen([bin_dir / "lineguard-agent", "run", "--config", str(config)])
    gate = DemoGate(args.out, port, agent_id="demo", line="demo-line", camera=args.category)
    try:
        print(f"agent running on {frames} replayed {args.category} images; verdicts from mqtt://127.0.0.1:{port}")
        watched = subprocess.run(
            [bin_dir / "lineguard-agent", "watch", "--config", str(config), "--count", str(frames), "--timeout", "120"],
            check=False,
        )
        gate.finish()
        if watched.returncode != 0:
            return watched.returncode
        from demo_samples import run_sample_loop  # the sample store's loop: samples -> labels -> retrain -> push

        looped = run_sample_loop(args.out, args.category, port, bin_dir)
        dashboard.hold_open()
        return looped
    finally:
        gate.close()
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
        dashboard.stop()
        broker.terminate()
        broker.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
