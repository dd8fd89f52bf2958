"""Demo, the loop: a line gone out of focus -> samples -> labels -> export -> retrain -> compare -> push.

Called by scripts/demo_agent.py with its broker running; needs `./run demo`'s data, bundle and trainer key.
Camera `top` of agent `demo-top` replays the category's calibration and test images blurred (a camera
slightly out of focus) with a few sharp good parts between them. The agent keeps samples; the operator
labels them over the broker (the file names tell good from defect here; on a real line a person looks);
the labelled samples are exported, a new bundle is trained on the original data plus the export, compared
with the serving one on the line's images, and pushed to the agent, restarted with shadow scoring, which
predicts the new reject rate. Every command is printed before it runs.
"""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from lineguard.agent.samples.files import read_sample, sample_folders

AGENT, CAMERA = "demo-top", "top"
BLUR_SIGMA = 1.9


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def command(bin_dir: Path, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run one Lineguard command, printed as a user would type it; its output goes to the terminal."""
    words = [str(arg) for arg in args]
    print("$ " + shlex.join(words), flush=True)
    done = subprocess.run([str(bin_dir / words[0]), *words[1:]], check=False)
    if check and done.returncode != 0:
        sys.exit(f"{words[0]} {words[1]} failed with exit code {done.returncode}")
    return done


def line_frames(data: Path, folder: Path) -> dict[int, tuple[str, str]]:
    """The replay (seq 1 = first file) and, per seq, what the part really is: ("ok"|"nok", defect type)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    blurred = [(p, True) for split in ("calibration", "test") for p in sorted((data / split).glob("*/*.png"))]
    sharp = [(p, False) for p in sorted((data / "train" / "good").glob("*.png"))[:12]]
    frames = blurred + sharp
    truth = {}
    for seq, index in enumerate(np.random.default_rng(7).permutation(len(frames)), 1):
        path, blur = frames[index]
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(folder / f"{seq:03d}.png"), cv2.GaussianBlur(image, (0, 0), BLUR_SIGMA) if blur else image)
        defect = "" if path.parent.name == "good" else path.parent.name
        truth[seq] = ("nok" if defect else "ok", defect)
    return truth


def write_config(out: Path, bundle: Path, port: int, replay: Path, *, loop: bool, shadow_s: float) -> Path:
    config = out / "top" / "agent.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    keys = out / "keys"
    config.write_text(
        f"""agent_id = "{AGENT}"
line = "demo-line"
run_dir = "{(out / "top" / "run").absolute()}"
state_dir = "{(out / "top" / "state").absolute()}"

[[cameras]]
name = "{CAMERA}"
source = "folder"
address = "{replay.absolute()}"
pixel_format = "mono8"
fps = 10
loop = {str(loop).lower()}

[engine]
bundle = "{bundle.absolute()}"
trusted_keys = ["{(keys / "trainer.pub").absolute()}"]
shadow_s = {shadow_s}

[decision]
deadline_ms = 1000

[rollout]
operator_keys = ["{(keys / "operator.pub").absolute()}"]

[samples]
close_call_margin = 0.3
random_one_in = 10

[mqtt]
port = {port}

[metrics]
port = 0
"""
    )
    return config


def start_agent(bin_dir: Path, config: Path, log: Path) -> subprocess.Popen:
    print(f"$ lineguard-agent run --config {config}   (log: {log})", flush=True)
    return subprocess.Popen([str(bin_dir / "lineguard-agent"), "run", "--config", str(config)], stderr=log.open("ab"))


def stop_agent(agent: subprocess.Popen) -> None:
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=60)


def label_samples(bin_dir: Path, out: Path, truth: dict[int, tuple[str, str]], port: int) -> None:
    """Label every stored sample with what the part really is, signed with the operator's key, over the broker."""
    groups: dict[tuple[str, str], list[str]] = {}
    for folder in sample_folders(out / "top" / "state" / "samples"):
        info = read_sample(folder)
        if info.meta.view:  # failsafes keep no image: nothing to label
            groups.setdefault(truth[info.meta.decision.seq], []).append(info.meta.sample_id)
    for (label, defect), ids in sorted(groups.items()):
        extra = ["--defect-type", defect] if defect else []
        args = ["lineguard-deploy", "label", label, *sorted(ids), "--agent", AGENT, *extra, "--by", "demo"]
        command(bin_dir, *args, "--port", str(port), "--operator-key", out / "keys" / "operator.pem")


def run_sample_loop(out: Path, category: str, port: int, bin_dir: Path) -> int:
    """The whole loop on the demo's data; returns the push's exit code."""
    data, old_bundle = out / "data" / category, out / category / "bundle"
    if not (out / "keys" / "operator.pem").exists():
        command(bin_dir, "lineguard-deploy", "keygen", out / "keys" / "operator.pem")
    shutil.rmtree(out / "top", ignore_errors=True)
    truth = line_frames(data, out / "top" / "line")
    say(f"camera {CAMERA}: {len(truth)} frames of a line gone out of focus; the agent keeps samples")
    config = write_config(out, old_bundle, port, out / "top" / "line", loop=False, shadow_s=0)
    agent = start_agent(bin_dir, config, out / "top" / "agent.log")
    try:
        command(bin_dir, "lineguard-agent", "watch", "--config", config, "--count", str(len(truth)), "--timeout", "180")
        time.sleep(2)  # the writer thread finishes the last samples
        command(bin_dir, "lineguard-agent", "samples", "list", "--config", config, "--limit", "10")
        say("labelling the samples over the broker (signed with the operator's key)")
        label_samples(bin_dir, out, truth, port)
        say("exporting the labelled samples")
        export = out / "top" / "export"
        command(bin_dir, "lineguard-agent", "samples", "export", "--config", config, "--out", export)
    finally:
        stop_agent(agent)
    say("retraining on the original data plus the export")
    new_work = out / f"{category}-2"
    shutil.rmtree(new_work, ignore_errors=True)
    keys = out / "keys"
    retrain = ["run", data, export, "--out", new_work, "--sign-key", keys / "trainer.pem"]
    command(bin_dir, "lineguard-train", *retrain, "--model-id", f"{category}-patchcore")
    say("comparing the serving bundle with the new one on the line's images")
    versus = ["compare-bundles", old_bundle, new_work / "bundle", "--data", export, "--out", new_work / "compare"]
    command(bin_dir, "lineguard-train", *versus, "--trusted-key", keys / "trainer.pub", "--close-call-margin", "0.3")
    say("pushing the new bundle to the agent, restarted on the looping line with 5 s of shadow scoring")
    config = write_config(out, old_bundle, port, out / "top" / "line", loop=True, shadow_s=5)
    agent = start_agent(bin_dir, config, out / "top" / "agent.log")
    try:
        command(bin_dir, "lineguard-agent", "watch", "--config", config, "--count", "20", "--timeout", "120")
        push = ["push", new_work / "bundle", "--agent", AGENT, "--port", str(port)]
        pushed = command(bin_dir, "lineguard-deploy", *push, "--operator-key", keys / "operator.pem", check=False)
    finally:
        stop_agent(agent)
    say(f"page: {new_work / 'compare' / 'compare.html'}; export README: {out / 'top' / 'export' / 'README.md'}")
    return pushed.returncode
