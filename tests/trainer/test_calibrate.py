"""Threshold choice and rate estimates. Label 1 = nok (defect), 0 = ok; rejected iff score >= threshold."""

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_curve, roc_curve

from lineguard.trainer.calibrate import (
    Calibration,
    RateEstimate,
    ThresholdMethod,
    calibrate,
    choose_threshold,
    parse_threshold_method,
)
from lineguard.trainer.errors import CalibrationError

F1 = ThresholdMethod("f1")
YOUDEN = ThresholdMethod("youden")


def float32_step(value, direction):
    """One float32 ulp from float32(value) towards direction, as a float64 (the scores here are float32)."""
    return float(np.nextafter(np.float32(value), np.float32(direction)))


def scores_labels(goods, defects):
    scores = np.array([*goods, *defects], dtype=np.float32)
    labels = np.array([0] * len(goods) + [1] * len(defects))
    return scores, labels


# --- parsing and str -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("f1", ThresholdMethod("f1")),
        ("youden", ThresholdMethod("youden")),
        ("fpr:0.01", ThresholdMethod("fpr", 0.01)),
        ("fpr:0", ThresholdMethod("fpr", 0.0)),
        ("recall:1", ThresholdMethod("recall", 1.0)),
        ("manual:-2.5", ThresholdMethod("manual", -2.5)),
        ("  FPR:0.05 ", ThresholdMethod("fpr", 0.05)),
    ],
)
def test_parse_reads_every_valid_form(text, expected):
    assert parse_threshold_method(text) == expected


@pytest.mark.parametrize("text", ["f1", "youden", "fpr:0.01", "fpr:0.0", "recall:0.99", "recall:1.0", "manual:3.25"])
def test_str_round_trips_through_parse(text):
    method = parse_threshold_method(text)
    assert str(method) == text
    assert parse_threshold_method(str(method)) == method


def test_str_of_a_method_built_from_an_int_or_numpy_value_still_round_trips():
    for method in (ThresholdMethod("fpr", 0), ThresholdMethod("manual", np.float64(0.5))):
        assert parse_threshold_method(str(method)) == method
    assert str(ThresholdMethod("fpr", 0)) == "fpr:0.0"


@pytest.mark.parametrize(
    "text",
    ["", "f2", "fpr", "fpr:", "fpr:abc", "f1:0.5", "youden:1", "fpr:nan", "manual:inf", "recall:0.9:1"],
)
def test_parse_rejects_bad_text_quoting_it_and_listing_the_valid_forms(text):
    with pytest.raises(CalibrationError) as caught:
        parse_threshold_method(text)
    message = str(caught.value)
    assert repr(text) in message
    for form in ("f1", "youden", "fpr:<rate>", "recall:<rate>", "manual:<threshold>"):
        assert form in message


@pytest.mark.parametrize("text", ["fpr:1", "fpr:1.5", "fpr:-0.1", "recall:0", "recall:1.01", "recall:-1"])
def test_parse_rejects_rates_out_of_range(text):
    with pytest.raises(CalibrationError, match="out of range"):
        parse_threshold_method(text)


def test_a_method_without_its_value_is_rejected():
    with pytest.raises(CalibrationError, match="needs a finite value"):
        ThresholdMethod("fpr")


def test_an_unknown_kind_is_rejected():
    with pytest.raises(CalibrationError, match="unknown"):
        ThresholdMethod("median")  # type: ignore[arg-type]


# --- f1 --------------------------------------------------------------------------------------------------


def test_f1_on_separable_scores_splits_the_gap():
    # goods 0.1 0.2 | defects 0.3 0.4: threshold 0.25 rejects exactly the defects (F1 = 1).
    scores, labels = scores_labels([0.1, 0.2], [0.3, 0.4])
    assert choose_threshold(scores, labels, F1) == pytest.approx(0.25)


def test_f1_on_overlapping_classes_finds_the_best_by_hand():
    # sorted: 0.1g 0.2g 0.3g 0.4d 0.5d 0.6g 0.7d 0.8d. F1 = 2tp / (2tp + fp + fn) at each gap:
    #   below 0.1: 8/12   0.15: 8/11   0.25: 8/10   0.35: tp4 fp1 -> 8/9 (best)   0.45: 6/8
    #   0.55: 4/7   0.65: 4/6   0.75: 2/5   above 0.8: 0
    scores, labels = scores_labels([0.1, 0.2, 0.3, 0.6], [0.4, 0.5, 0.7, 0.8])
    threshold = choose_threshold(scores, labels, F1)
    assert threshold == pytest.approx(0.35)
    assert f1_score(labels, scores >= threshold) == pytest.approx(8 / 9)


def test_f1_ties_go_to_the_highest_threshold():
    # sorted: 0.1d 0.2g 0.3g 0.4d. Below 0.1: tp2 fp2 -> 4/6; 0.15: 2/5; 0.25: 2/4; 0.35: tp1 fn1 -> 2/3.
    # 4/6 == 2/3: the tie goes to 0.35, which rejects two goods fewer.
    scores, labels = scores_labels([0.2, 0.3], [0.1, 0.4])
    assert choose_threshold(scores, labels, F1) == pytest.approx(0.35)


def test_f1_can_reject_everything_when_that_is_strictly_best():
    # sorted: 0.1d 0.2g 0.3d 0.4d. Rejecting all: tp3 fp1 -> 6/7; 0.25: tp2 fn1 -> 4/5. Below the min wins.
    scores, labels = scores_labels([0.2], [0.1, 0.3, 0.4])
    threshold = choose_threshold(scores, labels, F1)
    assert threshold == float32_step(0.1, -np.inf)


def test_f1_matches_the_best_f1_of_sklearn_precision_recall_curve_on_random_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(labels * 1.2, 1.0), 1)  # rounded: many ties
    threshold = choose_threshold(scores, labels, F1)
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        best = np.nanmax(2 * precision * recall / (precision + recall))
    assert f1_score(labels, scores >= threshold) == pytest.approx(best)
    assert threshold not in scores


# --- youden ----------------------------------------------------------------------------------------------


def test_youden_maximises_tpr_minus_fpr_by_hand():
    # goods 0.1 0.2 0.3 0.6, defects 0.4 0.5 0.7 0.8. At 0.35: TPR 4/4, FPR 1/4 -> 0.75 (best);
    # 0.45: 3/4 - 1/4 = 0.5; 0.65: 2/4 - 0 = 0.5; 0.25: 1 - 2/4 = 0.5.
    scores, labels = scores_labels([0.1, 0.2, 0.3, 0.6], [0.4, 0.5, 0.7, 0.8])
    assert choose_threshold(scores, labels, YOUDEN) == pytest.approx(0.35)


def test_youden_ties_go_to_the_highest_threshold():
    # goods 0.1 0.3, defects 0.2 0.4. 0.15: 1 - 1/2 = 0.5; 0.25: 1/2 - 1/2 = 0; 0.35: 1/2 - 0 = 0.5 -> 0.35.
    scores, labels = scores_labels([0.1, 0.3], [0.2, 0.4])
    assert choose_threshold(scores, labels, YOUDEN) == pytest.approx(0.35)


def test_youden_matches_the_best_of_sklearn_roc_curve_on_random_scores():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(labels * 1.0, 1.0), 1)
    threshold = choose_threshold(scores, labels, YOUDEN)
    fpr, tpr, _ = roc_curve(labels, scores)
    rejected = scores >= threshold
    achieved = rejected[labels == 1].mean() - rejected[labels == 0].mean()
    assert achieved == pytest.approx(np.max(tpr - fpr))


# --- fpr -------------------------------------------------------------------------------------------------


def test_fpr_zero_on_goods_only_sits_just_above_the_highest_good():
    scores, labels = scores_labels([0.1, 0.2, 0.3, 0.4], [])
    threshold = choose_threshold(scores, labels, ThresholdMethod("fpr", 0.0))
    assert threshold == float32_step(0.4, np.inf)
    assert not np.any(scores >= threshold)  # compared in float32: numpy casts the Python float down


def test_fpr_zero_on_float64_scores_steps_one_float64_ulp_above_the_highest_good():
    scores, labels = np.array([0.1, 0.2, 0.3, 0.4]), np.zeros(4, dtype=int)
    threshold = choose_threshold(scores, labels, ThresholdMethod("fpr", 0.0))
    assert threshold == np.nextafter(0.4, np.inf)


def test_fpr_zero_with_defects_above_the_goods_uses_the_midpoint():
    scores, labels = scores_labels([0.1, 0.2, 0.3, 0.4], [0.5, 0.9])
    assert choose_threshold(scores, labels, ThresholdMethod("fpr", 0.0)) == pytest.approx(0.45)


def test_fpr_a_quarter_of_four_goods_allows_exactly_one_false_reject():
    # Lowest threshold with at most 1 of 4 goods at or above it: between 0.3 and 0.4.
    scores, labels = scores_labels([0.1, 0.2, 0.3, 0.4], [])
    threshold = choose_threshold(scores, labels, ThresholdMethod("fpr", 0.25))
    assert threshold == pytest.approx(0.35)
    assert np.count_nonzero(scores >= threshold) == 1


def test_fpr_candidates_include_midpoints_next_to_defect_scores():
    # goods 0.1 0.2 0.3 0.4, defect 0.35: sorted ... 0.3g 0.35d 0.4g. The lowest threshold with one false
    # reject is the midpoint 0.325 between the good 0.3 and the defect 0.35, so the defect is caught.
    scores, labels = scores_labels([0.1, 0.2, 0.3, 0.4], [0.35])
    assert choose_threshold(scores, labels, ThresholdMethod("fpr", 0.25)) == pytest.approx(0.325)


# --- recall ----------------------------------------------------------------------------------------------


def test_recall_one_sits_at_the_midpoint_under_the_lowest_defect():
    scores, labels = scores_labels([0.1, 0.2], [0.3, 0.5])
    assert choose_threshold(scores, labels, ThresholdMethod("recall", 1.0)) == pytest.approx(0.25)


def test_recall_one_goes_below_the_minimum_when_a_defect_scores_lowest():
    scores, labels = scores_labels([0.2], [0.1, 0.5])
    threshold = choose_threshold(scores, labels, ThresholdMethod("recall", 1.0))
    assert threshold == float32_step(0.1, -np.inf)


def test_recall_half_is_the_highest_threshold_catching_half_the_defects():
    # sorted: 0.1g 0.3d 0.5d 0.6g 0.7d 0.9d. 0.8 catches 1 of 4; 0.65 catches 2 of 4 -> 0.65.
    scores, labels = scores_labels([0.1, 0.6], [0.3, 0.5, 0.7, 0.9])
    assert choose_threshold(scores, labels, ThresholdMethod("recall", 0.5)) == pytest.approx(0.65)


# --- manual and robustness -------------------------------------------------------------------------------


def test_manual_returns_its_value():
    scores, labels = scores_labels([0.1, 0.2], [])
    assert choose_threshold(scores, labels, ThresholdMethod("manual", 0.42)) == 0.42


def test_chosen_thresholds_never_sit_on_a_sample_score():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(labels, 1.0), 1).astype(np.float32)
    for text in ("f1", "youden", "fpr:0", "fpr:0.1", "recall:0.9", "recall:1"):
        threshold = choose_threshold(scores, labels, parse_threshold_method(text))
        assert threshold not in scores.astype(np.float64), text


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adjacent_float_scores_get_the_upper_one_as_threshold_so_verdicts_stay_right(dtype):
    low = dtype(0.5)
    high = np.nextafter(low, dtype(np.inf))
    scores, labels = np.array([low, high], dtype=dtype), np.array([0, 1])
    threshold = choose_threshold(scores, labels, F1)
    assert threshold == high
    assert (scores >= threshold).tolist() == [False, True]


def test_float32_verdicts_at_every_chosen_threshold_match_float64_verdicts():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 500)
    scores = (rng.normal(labels, 1.0) * 1e-3).astype(np.float32)
    for text in ("f1", "youden", "fpr:0", "fpr:0.05", "recall:0.9", "recall:1"):
        threshold = choose_threshold(scores, labels, parse_threshold_method(text))
        in_float32 = scores >= threshold
        in_float64 = scores.astype(np.float64) >= threshold
        assert np.array_equal(in_float32, in_float64), text


# --- input errors ----------------------------------------------------------------------------------------


def test_empty_input_is_an_error():
    with pytest.raises(CalibrationError, match="empty"):
        choose_threshold(np.array([]), np.array([]), F1)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(CalibrationError, match="3 scores but 2 labels"):
        choose_threshold(np.array([0.1, 0.2, 0.3]), np.array([0, 1]), F1)


def test_two_dimensional_input_is_an_error():
    with pytest.raises(CalibrationError, match="1-D"):
        choose_threshold(np.zeros((2, 2)), np.zeros((2, 2)), F1)


def test_nan_scores_are_an_error():
    with pytest.raises(CalibrationError, match="1 of 3 calibration scores are NaN"):
        choose_threshold(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1]), F1)


def test_labels_other_than_zero_and_one_are_an_error():
    with pytest.raises(CalibrationError, match=r"found \[2\]"):
        choose_threshold(np.array([0.1, 0.2, 0.3]), np.array([0, 1, 2]), F1)


@pytest.mark.parametrize("text", ["f1", "youden", "recall:0.9"])
def test_methods_that_need_defects_say_so_when_there_are_none(text):
    scores, labels = scores_labels([0.1, 0.2], [])
    with pytest.raises(CalibrationError, match="0 defects") as caught:
        choose_threshold(scores, labels, parse_threshold_method(text))
    assert f"threshold '{text}'" in str(caught.value)
    assert "fpr:<rate>" in str(caught.value)


@pytest.mark.parametrize("text", ["f1", "youden", "fpr:0.01"])
def test_methods_that_need_goods_say_so_when_there_are_none(text):
    scores, labels = scores_labels([], [0.3, 0.4])
    with pytest.raises(CalibrationError, match="0 goods"):
        choose_threshold(scores, labels, parse_threshold_method(text))


def test_recall_works_without_goods_but_calibrate_needs_them():
    scores, labels = scores_labels([], [0.3, 0.4])
    assert choose_threshold(scores, labels, ThresholdMethod("recall", 1.0)) == float32_step(0.3, -np.inf)
    with pytest.raises(CalibrationError, match="needs good images"):
        calibrate(scores, labels, ThresholdMethod("recall", 1.0))


@pytest.mark.parametrize("confidence", [0.0, 1.0, 95.0, -0.5])
def test_confidence_out_of_range_is_an_error(confidence):
    scores, labels = scores_labels([0.1, 0.2], [0.3])
    with pytest.raises(CalibrationError, match="confidence"):
        calibrate(scores, labels, F1, confidence=confidence)


# --- rate estimates and calibrate ------------------------------------------------------------------------


def test_zero_of_fifty_has_rate_zero_and_clopper_pearson_upper_bound_near_0_0711():
    # With 0 events, the exact two-sided 95% upper bound solves (1 - p)^50 = 0.025.
    estimate = RateEstimate.from_counts(0, 50, confidence=0.95)
    assert estimate.rate == 0.0
    assert estimate.low == 0.0
    assert estimate.high == pytest.approx(1 - 0.025 ** (1 / 50))
    assert estimate.high == pytest.approx(0.0711, abs=1e-4)


def test_all_of_n_has_lower_bound_from_the_other_side():
    estimate = RateEstimate.from_counts(50, 50, confidence=0.95)
    assert (estimate.rate, estimate.high) == (1.0, 1.0)
    assert estimate.low == pytest.approx(0.025 ** (1 / 50))


def test_calibrate_counts_false_rejects_and_escapes_at_the_chosen_threshold():
    # fpr:0.25 on goods 0.1 0.2 0.3 0.4 -> 0.35: one good (0.4) rejected; defects 0.2 and 0.9:
    # the 0.2 escapes (below 0.35), the 0.9 is caught.
    scores, labels = scores_labels([0.1, 0.2, 0.3, 0.4], [0.2, 0.9])
    result = calibrate(scores, labels, ThresholdMethod("fpr", 0.25), confidence=0.9)
    assert isinstance(result, Calibration)
    assert result.method == "fpr:0.25"
    assert result.threshold == pytest.approx(0.35)
    assert (result.n_good, result.n_defect) == (4, 2)
    assert (result.false_reject.count, result.false_reject.total, result.false_reject.rate) == (1, 4, 0.25)
    assert result.escape is not None
    assert (result.escape.count, result.escape.total, result.escape.rate) == (1, 2, 0.5)
    assert result.false_reject.low < 0.25 < result.false_reject.high
    assert result.confidence == 0.9


def test_calibrate_steps_in_the_float_type_of_the_scores_it_was_given():
    scores, labels = scores_labels([0.1, 0.2, 0.3, 0.4], [])
    result = calibrate(scores, labels, ThresholdMethod("fpr", 0.0))
    assert result.threshold == float32_step(0.4, np.inf)
    assert not np.any(scores >= result.threshold)


def test_calibrate_without_defects_has_no_escape_estimate():
    scores, labels = scores_labels([0.1] * 50, [])
    result = calibrate(scores, labels, ThresholdMethod("fpr", 0.0))
    assert result.escape is None
    assert result.false_reject.count == 0
    assert result.false_reject.high == pytest.approx(0.0711, abs=1e-4)


def test_calibration_to_dict_is_json_ready_with_nested_estimates():
    scores, labels = scores_labels([0.1, 0.2, 0.3], [0.4])
    as_dict = calibrate(scores, labels, F1).to_dict()
    assert as_dict["method"] == "f1"
    assert as_dict["false_reject"] == {
        "count": 0,
        "total": 3,
        "rate": 0.0,
        "low": 0.0,
        "high": pytest.approx(0.7076, abs=1e-4),
    }
    assert as_dict["escape"]["count"] == 0
    assert json.loads(json.dumps(as_dict, allow_nan=False))["threshold"] == pytest.approx(0.35)


def test_calibrate_without_defects_serialises_escape_as_null():
    scores, labels = scores_labels([0.1, 0.2], [])
    assert json.loads(json.dumps(calibrate(scores, labels, ThresholdMethod("fpr", 0.0)).to_dict()))["escape"] is None
