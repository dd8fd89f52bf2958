"""A fleet rollout as an operator runs it: three real agents (folder replay at 2 fps) on one Mosquitto broker,
`lineguard-deploy rollout` in waves, and what each agent serves afterwards, read from its verdicts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from broker import MosquittoBroker, find_program
from bundle_tools import bundle_variant
from mqtt_subscriber import Subscriber
from test_pipeline import write_config

from lineguard.agent.contract import ANY, Topics

pytestmark = pytest.mark.slow
TOPICS = Topics("lineguard")
BASE = f"fleet{os.getpid()}"  # rings in /dev/shm are named after agent ids: unique per test run
AGENTS = {f"{BASE}-a": "line-1", f"{BASE}-b": "line-1", f"{BASE}-c": "line-2"}


@dataclass
class Fleet:
    broker: MosquittoBroker
    verdicts: Subscriber
    source: Path  # the bundle every agent started with (brick-test@1.0.0)
    key: Path  # trainer and operator key (the agents trust it for both)
    work: Path

    def serving(self, agent: str) -> str:
        """The model on the agent's latest verdict."""
        return self.verdicts.verdicts(TOPICS.verdict(AGENTS[agent], agent, "cam0"))[-1].model

    def wait_serving(self, expected: dict[str, str], timeout_s: float = 30) -> dict[str, str]:
        """Wait until each agent's latest verdict carries the expected model; what they serve at the end."""
        self.verdicts.wait_until(lambda: all(self.serving(a) == m for a, m in expected.items()), timeout_s)
        return {agent: self.serving(agent) for agent in expected}

    def deploy(self, *args: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
        command = [Path(sys.executable).with_name("lineguard-deploy"), *args, "--port", str(self.broker.port)]
        env = {**os.environ, "LINEGUARD_OPERATOR_KEY": str(self.key)}
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)


@pytest.fixture(scope="module")
def fleet(trained_work, signing_key, replay, tmp_path_factory) -> Iterator[Fleet]:
    if find_program("mosquitto") is None:
        pytest.skip("mosquitto is not installed")
    work = tmp_path_factory.mktemp("fleet")
    folder, _ = replay
    broker = MosquittoBroker(work / "broker")
    subscriber = Subscriber(broker, Topics("lineguard").verdict(ANY, ANY, "cam0"))
    agents = []
    for agent, line in AGENTS.items():
        home = work / agent
        home.mkdir()
        # 2 fps, batches of one, no heatmaps: three agents share two cores with the rollout and its broker.
        config = write_config(
            home, broker, trained_work, signing_key, folder, fps=2, loop=True, deadline_ms=2000,
            agent_id=agent, line=line, max_batch=1, heatmap="none",
        )  # fmt: skip
        agents.append(
            subprocess.Popen(
                [Path(sys.executable).with_name("lineguard-agent"), "run", "--config", str(config)],
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        )
    fleet = Fleet(broker, subscriber, trained_work / "bundle", signing_key, work)
    try:
        up = subscriber.wait_until(
            lambda: all(fleet.verdicts.verdicts(TOPICS.verdict(line, a, "cam0")) for a, line in AGENTS.items()), 120
        )
        assert up, "not every agent of the fleet sent a verdict within 120 s"
        yield fleet
    finally:
        for process in agents:
            process.send_signal(signal.SIGTERM)
        for process in agents:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        subscriber.close()
        broker.close()


def _rollout(fleet: Fleet, bundle: Path, state: Path, *extra: str) -> subprocess.CompletedProcess:
    return fleet.deploy(
        "rollout", str(bundle), "--agents", f"{BASE}-*", "--canary", f"{BASE}-a", "--state", str(state),
        "--baseline", "2", "--abort-if", "failsafe>50%", *extra,
    )  # fmt: skip


def test_a_bundle_that_fails_the_canary_halts_after_the_first_wave_and_every_agent_keeps_its_model(fleet):
    before = {agent: fleet.serving(agent) for agent in AGENTS}
    broken = bundle_variant(fleet.source, fleet.work / "broken", fleet.key, model_version="3.0.0", golden_scale=3.0)
    state = fleet.work / "broken.json"

    result = _rollout(fleet, broken, state, "--waves", "1,100%", "--soak", "2")

    assert result.returncode == 2, result.stderr
    assert "canary failed" in result.stderr and f"halting the rollout in wave 1: {BASE}-a refused" in result.stderr
    saved = json.loads(state.read_text())
    assert saved["phase"] == "halted"
    assert {agent: each["outcome"] for agent, each in saved["agents"].items()} == {
        f"{BASE}-a": "refused",
        f"{BASE}-b": "skipped",
        f"{BASE}-c": "skipped",
    }
    time.sleep(2)  # a few more verdicts from every agent
    assert fleet.wait_serving(before) == before
    table = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert table[f"{BASE}-a"][1:3] == ["1", "refused"] and table[f"{BASE}-c"][1:3] == ["2", "skipped"], result.stdout


def test_a_refusal_in_the_second_wave_rolls_that_wave_back_and_the_canary_keeps_the_new_model(fleet):
    before = {agent: fleet.serving(agent) for agent in AGENTS}
    line_1_only = bundle_variant(
        fleet.source,
        fleet.work / "line-1",
        fleet.key,
        model_version="4.0.0",
        targets={"lines": ["line-1"], "agents": ["*"], "cameras": ["*"]},
    )
    state = fleet.work / "line-1.json"

    result = _rollout(fleet, line_1_only, state, "--waves", "1,100%", "--soak", "3")

    assert result.returncode == 2, result.stderr
    assert "is not meant for this agent" in result.stderr
    # The two agents of wave 2 were pushed at once (--parallel, default 8): both pushes began before any answer.
    lines = result.stderr.splitlines()
    started = [i for i, line in enumerate(lines) if line.startswith(f"wave 2: pushing brick-test@4.0.0 to {BASE}-")]
    answered = [i for i, line in enumerate(lines) if line.startswith(f"{BASE}-b: ") or "refused brick-test" in line]
    assert len(started) == 2 and answered and max(started) < min(answered), result.stderr
    saved = json.loads(state.read_text())
    outcomes = {agent: each["outcome"] for agent, each in saved["agents"].items()}
    assert outcomes == {f"{BASE}-a": "soaked", f"{BASE}-b": "rolled-back", f"{BASE}-c": "refused"}
    expected = {**before, f"{BASE}-a": "brick-test@4.0.0"}
    assert fleet.wait_serving(expected) == expected


def test_a_good_bundle_reaches_every_agent_wave_by_wave_and_an_interrupted_rollout_resumes(fleet):
    good = bundle_variant(fleet.source, fleet.work / "good", fleet.key, model_version="5.0.0")
    state = fleet.work / "good.json"
    # The replay's defects come in a block: over a few seconds the reject rate swings by 50 points, hence +80pp.
    command = [
        Path(sys.executable).with_name("lineguard-deploy"), "rollout", str(good), "--agents", f"{BASE}-*",
        "--canary", f"{BASE}-a", "--state", str(state), "--baseline", "1", "--waves", "1,50%,100%", "--soak", "4",
        "--abort-if", "failsafe>50%,reject>+80pp", "--min-frames", "6", "--port", str(fleet.broker.port),
    ]  # fmt: skip
    env = {**os.environ, "LINEGUARD_OPERATOR_KEY": str(fleet.key)}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and '"accepted"' not in (state.read_text() if state.exists() else ""):
        time.sleep(0.2)
    first.kill()  # the operator's machine stops mid-soak of the canary
    first.communicate()
    assert json.loads(state.read_text())["phase"] == "running"

    # Another bundle while that rollout is unfinished is refused, with the reason.
    other = fleet.deploy("rollout", str(fleet.source), "--agents", f"{BASE}-*", "--state", str(state))
    assert other.returncode == 2 and "holds an unfinished rollout of brick-test@5.0.0" in other.stderr, other.stderr

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)

    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the rollout of brick-test@5.0.0" in resumed.stderr
    saved = json.loads(state.read_text())
    assert saved["phase"] == "done"
    assert saved["waves"] == [[f"{BASE}-a"], [f"{BASE}-b"], [f"{BASE}-c"]]
    assert {each["outcome"] for each in saved["agents"].values()} == {"soaked"}
    expected = dict.fromkeys(AGENTS, "brick-test@5.0.0")
    assert fleet.wait_serving(expected) == expected

    status = fleet.deploy("status", "--wait", "3")
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:]}
    for agent, line in AGENTS.items():
        assert rows[agent][:3] == [agent, line, "yes"], status.stdout
        assert {"onnxruntime-cpu", "cam0", "brick-test@5.0.0"} <= set(rows[agent]), status.stdout
