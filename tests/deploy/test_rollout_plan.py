"""The pure half of a fleet rollout: selector, wave planner, abort rules, state file, and the fleet table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lineguard.agent.contract import AgentStatus, Backend, CameraStatus, Health
from lineguard.agent.signing import generate_key_pair
from lineguard.deploy.fleet import TABLE_HEADER, AgentView, Rates, fleet_rows, format_table, previous_model
from lineguard.deploy.plan import PlanError, WaveSize, first_breach, parse_abort_rules, parse_waves, plan_waves, select
from lineguard.deploy.rollout_state import (
    AgentState,
    RolloutState,
    StateFileError,
    check_resumable,
    load_state,
    save_state,
)

LINES = {"press-1": "line-1", "press-2": "line-1", "press-10": "line-2", "oven-1": "line-2", "pack": "line-3"}


def test_a_selector_picks_agents_by_line_glob_or_id_and_unions_its_terms():
    assert select("line=line-1", LINES) == ["press-1", "press-2"]
    assert select("press-?", LINES) == ["press-1", "press-2"]
    assert select("line=line-2,pack", LINES) == ["oven-1", "pack", "press-10"]
    assert select("line=line-*", LINES) == sorted(LINES)
    assert select("*", LINES) == sorted(LINES)


@pytest.mark.parametrize(
    ("selector", "named"),
    [("nobody", "matches no agent"), ("shift=3", "'shift=3'"), ("pack,a/b", "'a/b'"), ("line=", "'line='")],
)
def test_a_selector_that_cannot_be_used_names_the_bad_term(selector, named):
    with pytest.raises(PlanError, match=re.escape(named)):
        select(selector, LINES)


def test_waves_are_cumulative_counts_or_shares_rounded_up_and_empty_waves_are_dropped():
    agents = [f"a{index:02d}" for index in range(10)]
    sizes = parse_waves("1,25%,100%")
    assert sizes == (WaveSize(count=1), WaveSize(percent=25.0), WaveSize(percent=100.0))
    assert [len(wave) for wave in plan_waves(agents, sizes)] == [1, 2, 7]
    assert [len(wave) for wave in plan_waves(agents[:3], sizes)] == [1, 2]  # 25 % of 3 rounds up to 1: no new agent
    assert plan_waves(["x"], sizes) == [["x"]]
    waves = plan_waves(agents, parse_waves("2,3,50%,100%"), canary="a07")
    assert waves == [["a07", "a00"], ["a01"], ["a02", "a03"], ["a04", "a05", "a06", "a08", "a09"]]
    assert sorted(agent for wave in waves for agent in wave) == agents


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("1,25%", "'25%': the last wave must be 100%"),
        ("1,x,100%", "wave 'x'"),
        ("0,100%", "wave '0'"),
        ("1,150%,100%", "wave '150%'"),
        ("1,,100%", "wave ''"),
    ],
)
def test_a_wave_list_that_cannot_be_used_names_the_bad_term(text, named):
    with pytest.raises(PlanError, match=re.escape(named)):
        parse_waves(text)


def test_a_canary_must_be_one_of_the_selected_agents():
    with pytest.raises(PlanError, match="canary 'elsewhere'"):
        plan_waves(["a", "b"], parse_waves("1,100%"), canary="elsewhere")


def test_abort_rules_judge_absolute_rates_and_points_above_the_previous_model():
    failsafe, reject = parse_abort_rules("failsafe>2%, reject>+5pp")
    assert not failsafe.breach(Rates(100, 0, 2), None)
    assert "failsafe rate 3.0 % over 100 frames (failsafe>2%)" in failsafe.breach(Rates(100, 0, 3), None)
    baseline = Rates(200, 20, 0)  # 10 % rejects with the previous model
    assert not reject.breach(Rates(100, 15, 0), baseline)
    assert "reject rate 10.0 % -> 16.0 % (+6.0 points over 100 frames; reject>+5pp)" in reject.breach(
        Rates(100, 16, 0), baseline
    )
    assert not reject.breach(Rates(100, 90, 0), None)  # no verdicts of the previous model: nothing to compare
    assert not failsafe.breach(Rates(0, 0, 0), None)  # no frames yet: nothing to judge
    assert parse_abort_rules("") == ()
    assert not first_breach((failsafe, reject), Rates(3, 3, 3), baseline, min_frames=20)  # too few frames to judge
    assert first_breach((failsafe, reject), Rates(20, 20, 0), baseline, min_frames=20).startswith("reject rate")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("latency>5%", "'latency>5%'"),
        ("reject<5%", "'reject<5%'"),
        ("failsafe>2", "'failsafe>2'"),
        ("reject>+101pp", "above 100"),
    ],
)
def test_an_abort_rule_that_cannot_be_used_names_the_bad_term(text, named):
    with pytest.raises(PlanError, match=re.escape(named)):
        parse_abort_rules(f"failsafe>1%,{text}")


def _state(**changes) -> RolloutState:
    values = {
        "bundle": "/bundles/brick-2",
        "manifest_sha256": "ab" * 32,
        "model": "brick@2.0.0",
        "selector": "line=line-1",
        "waves_spec": "1,100%",
        "abort_if": "failsafe>2%",
        "soak_s": 60.0,
        "waves": [["press-1"], ["press-2"]],
        "agents": {"press-1": AgentState(wave=0, previous="brick@1.0.0"), "press-2": AgentState(wave=1)},
        "started_ts": 1.0,
        "updated_ts": 1.0,
        **changes,
    }
    return RolloutState(**values)


def test_the_state_file_round_trips_and_is_replaced_whole(tmp_path):
    path = tmp_path / "deep" / "rollout.json"
    assert load_state(path) is None
    state = _state()
    save_state(path, state)
    state.agents["press-1"].outcome = "accepted"
    save_state(path, state)
    assert load_state(path) == state
    assert [each.name for each in path.parent.iterdir()] == ["rollout.json"]  # no temporary file left behind


def test_an_unfinished_rollout_of_another_bundle_is_refused_and_a_finished_one_is_not(tmp_path):
    path = tmp_path / "rollout.json"
    running = _state()
    check_resumable(running, manifest_sha256="ab" * 32, path=path)
    with pytest.raises(
        StateFileError, match=re.escape("holds an unfinished rollout of brick@2.0.0 from /bundles/brick-2")
    ):
        check_resumable(running, manifest_sha256="cd" * 32, path=path)
    check_resumable(_state(phase="halted"), manifest_sha256="cd" * 32, path=path)


def test_a_file_that_is_no_rollout_state_is_refused_with_its_name(tmp_path):
    path = tmp_path / "rollout.json"
    path.write_text(json.dumps({"bundle": 3}))
    with pytest.raises(StateFileError, match="is not a rollout state file"):
        load_state(path)


def test_the_rollout_command_refuses_bad_rules_and_another_bundle_before_touching_the_broker(tmp_path):
    deploy = Path(sys.executable).with_name("lineguard-deploy")
    key, _ = generate_key_pair(tmp_path / "operator.pem")
    env = {**os.environ, "LINEGUARD_OPERATOR_KEY": str(key)}
    bundle = tmp_path / "bundle"  # only its manifest is read before the broker is asked anything
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"model_id": "brick", "model_version": "3.0.0"}))
    base = [deploy, "rollout", str(bundle), "--agents", "*", "--port", "1", "--state", str(tmp_path / "s.json")]
    bad = subprocess.run([*base, "--abort-if", "failsafe>2%,cpu>90%"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "abort rule 'cpu>90%'" in bad.stderr, bad.stderr
    save_state(tmp_path / "s.json", _state())
    other = subprocess.run(base, capture_output=True, text=True, env=env)
    assert other.returncode == 2 and "holds an unfinished rollout of brick@2.0.0" in other.stderr, other.stderr


def test_the_fleet_table_has_a_row_per_camera_with_its_model_rate_and_failsafe_share():
    status = AgentStatus(
        agent_id="press-1",
        line="line-1",
        online=True,
        health=Health(state="degraded", reasons=("cam1 slow",)),
        model="brick@1.0.0",
        cameras={
            "cam0": CameraStatus(fps=12.0, failsafe_share=0.0),
            "cam1": CameraStatus(fps=3.5, failsafe_share=0.25),
        },
        backend=Backend(name="onnxruntime-cpu", detail="no GPU"),
        ts=1.0,
    )
    offline = AgentStatus(agent_id="oven-1", line="line-2", online=False, reason="stopped", ts=1.0)
    views = {
        "press-1": AgentView(status, 1.0, {"cam1": "bolt@3.0.0"}),
        "oven-1": AgentView(offline, 1.0),
        "ghost": AgentView(None, 0.0, {"cam0": "x@1"}),  # verdicts but no status: not listed
    }
    rows = fleet_rows(views)
    assert rows == [
        ("oven-1", "line-2", "no", "stopped", "—", "—", "—", "—", "—"),
        ("press-1", "line-1", "yes", "degraded", "onnxruntime-cpu", "cam0", "brick@1.0.0", "12.0", "0.0 %"),
        ("press-1", "line-1", "yes", "degraded", "onnxruntime-cpu", "cam1", "bolt@3.0.0", "3.5", "25.0 %"),
    ]
    table = format_table(TABLE_HEADER, rows).splitlines()
    assert table[0].split() == list(TABLE_HEADER)
    assert len({line.index("line-") for line in table[1:]}) == 1  # columns line up


def test_the_model_a_rollback_returns_to_is_the_one_serving_the_bundle_s_model_id():
    per_camera = AgentStatus(
        agent_id="press-3",
        line="line-1",
        online=True,
        cameras={"top": CameraStatus(model="brick@2.0.0", fps=2.0), "lid": CameraStatus(model="cap@1.0.0", fps=2.0)},
        ts=1.0,
    )
    assert previous_model(per_camera, "cap") == "cap@1.0.0"
    assert previous_model(per_camera, "brick") == "brick@2.0.0"
    single = AgentStatus(agent_id="press-4", line="line-1", online=True, model="brick@2.0.0", ts=1.0)
    assert previous_model(single, "brick") == "brick@2.0.0"
    assert previous_model(single, "gear") == "brick@2.0.0"  # one model: a push of another id replaces it
    assert previous_model(None, "brick") == ""
