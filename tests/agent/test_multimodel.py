"""One agent, two cameras, two models, as a user runs it: each camera's verdicts carry its own model and
threshold, a push or rollback of one model id swaps only that model's camera, and no frame is lost on either."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
from bundle_tools import bundle_variant
from mqtt_subscriber import Subscriber
from test_pipeline import deploy_cli, stop

from lineguard.agent.contract import AgentStatus, Topics
from lineguard.agent.signing import public_key_path

pytestmark = pytest.mark.slow
TOPICS = Topics("lineguard")
AGENT = f"agent-mm-{os.getpid()}"  # unique: rings in /dev/shm are named after it
CAMERAS = {"top": "brick-test", "lid": "cap-test"}


def write_config(tmp_path: Path, port: int, signing_key: Path, folder: Path, bundles: dict[str, Path]) -> Path:
    key = public_key_path(signing_key)
    models = "".join(f'[[models]]\nid = "{model}"\nbundle = "{bundle}"\n' for model, bundle in bundles.items())
    cameras = "".join(
        f'[[cameras]]\nname = "{camera}"\nmodel = "{model}"\nsource = "folder"\naddress = "{folder}"\n'
        "fps = 4\nloop = true\n"
        for camera, model in CAMERAS.items()
    )
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""agent_id = "{AGENT}"
line = "line-1"
run_dir = "{tmp_path / "run"}"
state_dir = "{tmp_path / "state"}"
{models}
{cameras}
[engine]
trusted_keys = ["{key}"]
max_batch = 4
threads = 1

[rollout]
operator_keys = ["{key}"]

[decision]
deadline_ms = 2000

[mqtt]
port = {port}

[metrics]
port = 0
"""
    )
    return config


def test_each_camera_is_scored_by_its_own_model_and_a_push_or_rollback_swaps_only_the_cameras_of_that_model(
    broker, trained_work, signing_key, replay, tmp_path, start_agent
):
    folder, _ = replay
    source = trained_work / "bundle"
    manifest = json.loads((source / "manifest.json").read_text())
    brick_threshold = manifest["threshold"]["value"]
    cap_threshold = brick_threshold * 0.8  # its own calibration: a different threshold than brick's
    cap = bundle_variant(
        source,
        tmp_path / "cap",
        signing_key,
        model_id="cap-test",
        model_version="1.0.0",
        threshold={**manifest["threshold"], "value": cap_threshold},
    )
    subscriber = Subscriber(broker, "lineguard/#")
    config = write_config(tmp_path, broker.port, signing_key, folder, {"brick-test": source, "cap-test": cap})
    agent = start_agent(config)

    def camera_verdicts(camera: str):
        return subscriber.verdicts(TOPICS.verdict("line-1", AGENT, camera))

    assert subscriber.wait_until(lambda: all(len(camera_verdicts(c)) >= 6 for c in CAMERAS), 90)
    assert subscriber.wait_until(lambda: len(subscriber.records(TOPICS.status(AGENT), AgentStatus)) >= 1, 10)
    status = subscriber.records(TOPICS.status(AGENT), AgentStatus)[-1]
    assert status.model is None  # the cameras have models of their own: each says which
    assert {name: each.model for name, each in status.cameras.items()} == {
        "top": "brick-test@1.0.0",
        "lid": "cap-test@1.0.0",
    }

    unused = bundle_variant(source, tmp_path / "gear", signing_key, model_id="gear-test", model_version="1.0.0")
    refused = deploy_cli(broker, signing_key, "push", str(unused), "--agent", AGENT, "--timeout", "120")
    assert refused.returncode == 2, refused.stdout
    assert "no camera of this agent uses model gear-test; its cameras use model ids brick-test, cap-test" in (
        refused.stderr
    )

    newer_cap = bundle_variant(cap, tmp_path / "cap-2", signing_key, model_version="2.0.0")
    pushed = deploy_cli(broker, signing_key, "push", str(newer_cap), "--agent", AGENT, "--timeout", "120")
    assert pushed.returncode == 0, pushed.stderr
    assert subscriber.wait_until(lambda: camera_verdicts("lid")[-1].model == "cap-test@2.0.0", 30)
    unnamed = deploy_cli(broker, signing_key, "rollback", "--agent", AGENT)
    assert unnamed.returncode == 2, unnamed.stdout
    assert "name the model to roll back: this agent serves model ids brick-test, cap-test" in unnamed.stdout
    rolled = deploy_cli(broker, signing_key, "rollback", "--agent", AGENT, "--to", "cap-test@1.0.0")
    assert rolled.returncode == 0, rolled.stderr
    assert subscriber.wait_until(lambda: camera_verdicts("lid")[-1].model == "cap-test@1.0.0", 30)
    count_top = len(camera_verdicts("top"))
    assert subscriber.wait_until(lambda: len(camera_verdicts("top")) >= count_top + 4, 30)
    shown = deploy_cli(broker, signing_key, "status", "--agent", AGENT, "--wait", "3")
    rows = {row[5]: row[6] for line in shown.stdout.splitlines() if (row := line.split()) and row[0] == AGENT}
    assert shown.returncode == 0 and rows == {"top": "brick-test@1.0.0", "lid": "cap-test@1.0.0"}, shown.stdout
    assert stop(agent) == 0

    for camera, model in CAMERAS.items():
        received = sorted(camera_verdicts(camera), key=lambda v: v.seq)
        seqs = [v.seq for v in received]
        assert seqs == list(range(1, seqs[-1] + 1)), f"{camera}: a frame was lost or answered twice"
        assert not [(v.seq, v.reason) for v in received if v.verdict == "failsafe"]
        threshold = brick_threshold if model == "brick-test" else cap_threshold
        for verdict in received:
            assert verdict.model.startswith(f"{model}@") and verdict.threshold == pytest.approx(threshold)
            assert verdict.verdict == ("reject" if verdict.score >= threshold else "accept")
        changes = [(a, b) for a, b in itertools.pairwise(v.model for v in received) if a != b]
        expected = [("cap-test@1.0.0", "cap-test@2.0.0"), ("cap-test@2.0.0", "cap-test@1.0.0")]
        assert changes == (expected if camera == "lid" else []), camera  # push and rollback: lid's model only
