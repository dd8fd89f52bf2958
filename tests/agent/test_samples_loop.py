"""The whole loop on real parts: the agent keeps samples of a line gone out of focus, people label them over the
broker, the export trains a new bundle with the CLI, compare-bundles shows it fixes the false rejects, and the
push reports the shadow scoring's prediction.

The line: the sample data's images, blurred (sigma 1.9) as by a camera slightly out of focus: good parts the
model trained on sharp now score near or above its threshold (close calls and false rejects), defects still
stand out; interleaved with sharp good parts (plain accepts, a few kept at random). More frames than the store
holds, so every class evicts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from mqtt_subscriber import Subscriber
from test_pipeline import deploy_cli, stop, write_config

from lineguard.agent.contract import ModelEvent, SampleLabelResult, SampleRecord, Topics, Verdict
from lineguard.agent.samples.files import read_sample, sample_folders
from lineguard.agent.samples.policy import SamplePolicy
from lineguard.agent.signing import public_key_path

pytestmark = pytest.mark.slow
AGENT = f"agent-{os.getpid()}"  # the same id test_pipeline's write_config gives: rings in /dev/shm are named after it
TOPICS = Topics("lineguard")
PER_CLASS = 6
# A generous ring and deadline (the CI machine is shared): a failsafe here would be the machine, not the store.
SAMPLES = f"""
[ring]
slots = 64

[samples]
max_per_class = {PER_CLASS}
close_call_margin = 0.3
random_one_in = 4
max_per_minute = 600
"""


def line_frames(sample_root: Path, folder: Path) -> dict[int, tuple[str, str]]:
    """Write the replay; {seq: (truth "ok"/"nok", defect type or "")} in replay order (seq 1 = first file)."""
    blurred = [(p, True) for p in sorted(sample_root.glob("*/*/*.png")) if "ground_truth" not in p.parent.parent.name]
    sharp = [
        (p, False)
        for p in sorted(sample_root.glob("test/good/*.png")) + sorted(sample_root.glob("calibration/good/*.png"))
    ]
    frames = blurred + sharp
    order = np.random.default_rng(7).permutation(len(frames))
    folder.mkdir(parents=True)
    truth = {}
    for seq, index in enumerate(order, 1):
        path, blur = frames[index]
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(folder / f"{seq:03d}.png"), cv2.GaussianBlur(image, (0, 0), 1.9) if blur else image)
        defect = path.parent.name if path.parent.name != "good" else ""
        truth[seq] = ("nok" if defect else "ok", defect)
    return truth


def agent_config(tmp_path, broker, trained_work, signing_key, folder, *, loop: bool, extra: str = "") -> Path:
    config = write_config(tmp_path, broker, trained_work, signing_key, folder, fps=8, loop=loop, deadline_ms=3000)
    config.write_text(config.read_text() + SAMPLES + extra)
    return config


def expected_kinds(verdicts: list[Verdict], manifest: dict) -> dict[int, str]:
    """seq -> the class the agent's policy keeps it as (the same pure rules, from the bundle's numbers)."""
    policy = SamplePolicy(0.3, 4, AGENT)
    scale = manifest["score_normalisation"]["scale"]
    kinds = {}
    for v in verdicts:
        kind = policy.kind(v.verdict, v.score, threshold=v.threshold, scale=scale, camera=v.camera, seq=v.seq)
        if kind is not None:
            kinds[v.seq] = kind
    return kinds


def test_line_samples_are_kept_within_budget_labelled_exported_retrained_compared_and_pushed(
    broker,
    trained_work,
    signing_key,
    sample_root,
    tmp_path,
    start_agent,
):
    from lineguard.agent.__main__ import main as agent_main
    from lineguard.trainer.__main__ import main as train_main

    truth = line_frames(sample_root, tmp_path / "line")
    subscriber = Subscriber(broker, "lineguard/#")
    config = agent_config(tmp_path, broker, trained_work, signing_key, tmp_path / "line", loop=False)
    agent = start_agent(config)
    verdict_topic = TOPICS.verdict("line-1", AGENT, "cam0")
    assert subscriber.wait_until(lambda: len(subscriber.verdicts(verdict_topic)) >= len(truth), 120)
    verdicts = sorted(subscriber.verdicts(verdict_topic), key=lambda v: v.seq)

    # One verdict per frame, none late or lost: the store never holds a frame up.
    assert [v.seq for v in verdicts] == list(range(1, len(truth) + 1))
    assert not [(v.seq, v.cause, v.reason) for v in verdicts if v.verdict == "failsafe"]
    manifest = json.loads((trained_work / "bundle" / "manifest.json").read_text())
    kinds = expected_kinds(verdicts, manifest)
    sample_topic = TOPICS.sample("line-1", AGENT, "cam0")
    assert subscriber.wait_until(lambda: len(subscriber.records(sample_topic, SampleRecord)) >= len(kinds), 30)
    announced = {r.seq: r.kind for r in subscriber.records(sample_topic, SampleRecord)}
    assert announced == kinds  # every kept verdict announced once, as the policy says
    false_rejects = [v.seq for v in verdicts if v.verdict == "reject" and truth[v.seq][0] == "ok"]
    assert len(false_rejects) >= 5, "the blurred line should cost the old model false rejects"

    # Budgets: each class holds its newest PER_CLASS samples; the older ones were evicted, oldest first.
    root = tmp_path / "state" / "samples"
    stored = {info.meta.decision.seq: info for info in map(read_sample, sample_folders(root))}
    for kind in ("reject", "close-call", "random"):
        of_kind = sorted(seq for seq, each in kinds.items() if each == kind)
        held = sorted(seq for seq, info in stored.items() if info.meta.kind == kind)
        assert held == of_kind[-PER_CLASS:], kind
    assert len(kinds) > len(stored)  # more was announced than the store holds

    # Labels round-trip over the broker: signed by the operator, answered per label.
    by_label: dict[tuple[str, str], list[str]] = {}
    for seq, info in stored.items():
        by_label.setdefault(truth[seq], []).append(info.meta.sample_id)
    for (label, defect), ids in sorted(by_label.items()):
        extra = ("--defect-type", defect) if defect else ()
        done = deploy_cli(broker, signing_key, "label", label, *ids, "--agent", AGENT, *extra, "--by", "qa")
        assert done.returncode == 0, done.stderr
        assert done.stdout.count(": stored:") == len(ids)
    results = subscriber.records(TOPICS.sample_events(AGENT), SampleLabelResult)
    assert len(results) == len(stored) and {r.outcome for r in results} == {"stored"}

    # Export, then retrain on the original data plus the export with the CLI.
    export = tmp_path / "export"
    assert agent_main(["samples", "export", "--config", str(config), "--out", str(export)]) == 0
    assert stop(agent) == 0
    new_work = tmp_path / "new"
    retrain = ["run", str(sample_root), str(export), "--out", str(new_work), "--sign-key", str(signing_key)]
    assert train_main([*retrain, "--bank-size", "1024", "--model-id", "brick-test", "--model-version", "1.1.0"]) == 0
    assert "+export" in json.loads((new_work / "bundle" / "manifest.json").read_text())["dataset"]["name"]

    # compare-bundles: the new bundle rejects fewer of the line's good parts, and has fewer close calls.
    key = str(public_key_path(signing_key))
    versus = ["compare-bundles", str(trained_work / "bundle"), str(new_work / "bundle"), "--data", str(export)]
    assert (
        train_main([*versus, "--out", str(tmp_path / "compare"), "--trusted-key", key, "--close-call-margin", "0.3"])
        == 0
    )
    document = json.loads((tmp_path / "compare" / "compare.json").read_text())
    groups = {group["name"]: group for group in document["groups"]}
    overall = groups["all images"]
    assert overall["new"]["false_rejects"]["count"] < overall["old"]["false_rejects"]["count"]
    rejects = groups["kept as reject"]
    assert rejects["new"]["false_rejects"]["count"] < rejects["old"]["false_rejects"]["count"]
    close = groups["kept as close-call"]
    assert close["new"]["close_calls"] < close["old"]["close_calls"]
    assert document["escapes_rise"] == (overall["new"]["escapes"]["count"] > overall["old"]["escapes"]["count"])

    # Push it to the agent, restarted on the looping line with shadow scoring: the push says what it predicted.
    config = agent_config(tmp_path, broker, trained_work, signing_key, tmp_path / "line", loop=True)
    config.write_text(config.read_text().replace("max_batch = 4", "max_batch = 4\nshadow_s = 3"))
    agent = start_agent(config)
    seen = len(subscriber.verdicts(verdict_topic))
    assert subscriber.wait_until(lambda: len(subscriber.verdicts(verdict_topic)) >= seen + 10, 60)
    pushed = deploy_cli(broker, signing_key, "push", str(new_work / "bundle"), "--agent", AGENT, "--timeout", "120")
    assert pushed.returncode == 0, pushed.stderr
    assert "brick-test@1.1.0 accepted" in pushed.stdout
    assert "shadow: " in pushed.stdout and " live frames scored by both models: reject rate " in pushed.stdout, (
        pushed.stdout
    )
    assert subscriber.wait_until(lambda: subscriber.verdicts(verdict_topic)[-1].model == "brick-test@1.1.0", 30)
    events = [e for e in subscriber.records(TOPICS.model_events(AGENT), ModelEvent) if e.outcome == "accepted"]
    assert events and events[-1].shadow is not None and events[-1].shadow.frames > 0
    time.sleep(0.5)
    assert stop(agent) == 0
    assert len(list(sample_folders(root))) >= len(stored)  # the store survived the restart
