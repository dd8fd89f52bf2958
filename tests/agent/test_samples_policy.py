"""Which verdicts become samples: pure rules, checked without any process."""

from __future__ import annotations

import numpy as np
import pytest

from lineguard.agent.samples.policy import SamplePolicy

# The bundle's normalisation: median good score 0.2, threshold 0.6 -> scale 2 x (0.6 - 0.2) = 0.8.
THRESHOLD, SCALE = 0.6, 0.8


def kind(policy: SamplePolicy, verdict: str, score: float | None, seq: int = 1) -> str | None:
    return policy.kind(verdict, score, threshold=THRESHOLD, scale=SCALE, camera="top", seq=seq)


def test_every_reject_and_failsafe_is_kept_whatever_the_score():
    policy = SamplePolicy(0.0, 0, "a")
    assert kind(policy, "reject", 0.9) == "reject"
    assert kind(policy, "failsafe", None) == "failsafe"


def test_close_calls_are_accepts_within_the_margin_of_the_way_from_the_median_good_score_to_the_threshold():
    policy = SamplePolicy(0.25, 0, "a")  # the last quarter of 0.2 -> 0.6: scores from 0.5 up
    assert policy.close_call_floor(THRESHOLD, SCALE) == pytest.approx(0.5)
    assert kind(policy, "accept", 0.55) == "close-call"
    assert kind(policy, "accept", 0.5) == "close-call"
    assert kind(policy, "accept", 0.49) is None


def test_a_zero_margin_keeps_no_close_calls():
    assert kind(SamplePolicy(0.0, 0, "a"), "accept", 0.5999) is None


def test_about_one_in_n_other_accepts_is_a_random_pick_and_every_process_picks_the_same_frames():
    policy = SamplePolicy(0.0, 50, "press-3")
    picks = [seq for seq in range(20_000) if kind(policy, "accept", 0.0, seq) == "random"]
    assert 320 <= len(picks) <= 480  # 400 expected
    assert picks == [seq for seq in range(20_000) if SamplePolicy(0.0, 50, "press-3").is_random_pick("top", seq)]
    other_agent = [seq for seq in range(20_000) if SamplePolicy(0.0, 50, "press-4").is_random_pick("top", seq)]
    assert picks != other_agent
    # Not periodic: a line with 50 stations does not always sample the same station.
    assert len({seq % 50 for seq in picks}) > 40


def test_random_one_in_zero_picks_nothing():
    assert not any(SamplePolicy(0.0, 0, "a").is_random_pick("top", seq) for seq in range(1000))


def test_the_engine_keeps_the_maps_of_exactly_the_accepts_decision_will_keep():
    policy = SamplePolicy(0.25, 7, "a")
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.0, 1.0, 500).astype(np.float32)
    frames = [("top", seq) for seq in range(500)]
    rows = policy.map_rows(scores, frames, threshold=THRESHOLD, scale=SCALE)
    kept = [
        row
        for row, score in enumerate(scores.tolist())
        if kind(policy, "reject" if score >= THRESHOLD else "accept", score, seq=row) is not None
    ]
    assert rows == kept


def test_a_bad_margin_is_refused():
    with pytest.raises(ValueError, match="close_call_margin"):
        SamplePolicy(1.5, 0, "a")
