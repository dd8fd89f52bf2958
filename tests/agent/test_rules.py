import numpy as np
import pytest

from lineguard.agent.decision.rules import decide, rows_needing_maps


def test_a_score_below_the_threshold_is_accepted_and_at_it_rejected():
    assert decide(0.99, None, threshold=1.0, min_defect_area_px=0).verdict == "accept"
    assert decide(1.0, None, threshold=1.0, min_defect_area_px=0).verdict == "reject"


def test_a_minimum_area_accepts_a_tiny_hot_spot_and_rejects_a_large_one():
    anomaly_map = np.zeros((10, 10), np.float32)
    anomaly_map[0, :3] = 2.0  # 3 pixels at or above the threshold
    small = decide(2.0, anomaly_map, threshold=1.0, min_defect_area_px=4)
    assert small.verdict == "accept" and "3 px < 4 px" in small.reason
    anomaly_map[1, :3] = 2.0  # 6 pixels
    assert decide(2.0, anomaly_map, threshold=1.0, min_defect_area_px=4).verdict == "reject"


@pytest.mark.parametrize("score", [float("nan"), float("inf")])
def test_a_non_finite_score_is_a_failsafe_never_an_accept(score):
    assert decide(score, None, threshold=1.0, min_defect_area_px=0).verdict == "failsafe"


def test_a_minimum_area_without_a_map_is_a_failsafe():
    assert decide(5.0, None, threshold=1.0, min_defect_area_px=10).verdict == "failsafe"


@pytest.mark.parametrize(
    ("heatmap", "min_area", "rows"),
    [
        ("rejects", 0, [1, 3]),  # heatmaps of rejects: only frames at or above the threshold
        ("none", 0, []),  # nobody reads a map
        ("none", 5, [1, 3]),  # the area rule reads the maps of would-be rejects
        ("all", 0, [0, 1, 2, 3]),
        ("every-nth", 0, [0, 1, 2, 3]),  # decision counts frames; the engine cannot tell which is nth
    ],
)
def test_the_engine_copies_out_only_the_maps_the_decision_will_read(heatmap, min_area, rows):
    scores = np.array([0.5, 1.0, float("nan"), 3.0], np.float32)
    assert rows_needing_maps(scores, threshold=1.0, min_defect_area_px=min_area, heatmap=heatmap) == rows
