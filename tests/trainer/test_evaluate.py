"""Image and pixel metrics. Label 1 = nok (defect), 0 = ok; rejected iff score >= threshold."""

import json

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lineguard.trainer.evaluate import aupro, defect_type_metrics, image_metrics, pixel_auroc, split_metrics
from lineguard.trainer.scoring import SplitScores

# --- image_metrics ---------------------------------------------------------------------------------------


def test_image_metrics_on_a_small_case_by_hand():
    # scores 0.1g 0.4g 0.35d 0.8d at threshold 0.3: rejected 0.4 (fp), 0.35 (tp), 0.8 (tp); 0.1 accepted (tn).
    # precision 2/3, recall 2/2, F1 4/5, accuracy 3/4, fpr 1/2.
    # AUROC: defect-good pairs ranked right: 0.35>0.1, 0.8>0.1, 0.8>0.4, not 0.35>0.4 -> 3/4.
    # AP: ranked 0.8d (P 1, R 1/2), 0.4g, 0.35d (P 2/3, R 1) -> 1/2 * 1 + 1/2 * 2/3 = 5/6.
    metrics = image_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]), 0.3)
    assert metrics["confusion"] == {"tn": 1, "fp": 1, "fn": 0, "tp": 2}
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == 1.0
    assert metrics["f1"] == pytest.approx(4 / 5)
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    assert metrics["fpr"] == pytest.approx(1 / 2)
    assert metrics["image_auroc"] == pytest.approx(3 / 4)
    assert metrics["average_precision"] == pytest.approx(5 / 6)
    assert (metrics["threshold"], metrics["n_good"], metrics["n_defect"]) == (0.3, 2, 2)


def test_a_score_equal_to_the_threshold_is_rejected():
    metrics = image_metrics(np.array([0.5, 0.5]), np.array([0, 1]), 0.5)
    assert metrics["confusion"] == {"tn": 0, "fp": 1, "fn": 0, "tp": 1}


def test_confusion_counts_are_plain_ints():
    metrics = image_metrics(np.array([0.1, 0.9], dtype=np.float32), np.array([0, 1]), 0.5)
    assert all(type(count) is int for count in metrics["confusion"].values())


def test_separable_scores_have_image_auroc_one():
    metrics = image_metrics(np.array([0.1, 0.2, 0.7, 0.9]), np.array([0, 0, 1, 1]), 0.5)
    assert metrics["image_auroc"] == 1.0
    assert metrics["average_precision"] == 1.0


def test_equal_scores_have_image_auroc_one_half():
    metrics = image_metrics(np.full(6, 0.3), np.array([0, 0, 0, 1, 1, 1]), 0.5)
    assert metrics["image_auroc"] == pytest.approx(0.5)


def test_goods_only_give_none_for_undefined_metrics_and_stay_json_ready():
    # Nothing rejected and no defects: precision 0/0, recall 0/0, F1 0/0 are None; fpr is 0/2 = 0.
    metrics = image_metrics(np.array([0.1, 0.2]), np.array([0, 0]), 0.5)
    assert metrics["image_auroc"] is None
    assert metrics["average_precision"] is None
    assert metrics["precision"] is None
    assert metrics["recall"] is None
    assert metrics["f1"] is None
    assert metrics["fpr"] == 0.0
    assert metrics["accuracy"] == 1.0
    json.dumps(metrics, allow_nan=False)


def test_defects_only_give_none_for_the_false_reject_rate():
    # All defects accepted: precision 0/0 -> None, recall 0/2 = 0, F1 = 0 / (0 + 0 + 2) = 0, fpr 0/0 -> None.
    metrics = image_metrics(np.array([0.1, 0.2]), np.array([1, 1]), 0.5)
    assert (metrics["precision"], metrics["recall"], metrics["f1"], metrics["fpr"]) == (None, 0.0, 0.0, None)
    json.dumps(metrics, allow_nan=False)


def test_image_metrics_input_errors():
    with pytest.raises(ValueError, match="non-empty"):
        image_metrics(np.array([]), np.array([]), 0.5)
    with pytest.raises(ValueError, match="one length"):
        image_metrics(np.array([0.1, 0.2]), np.array([0]), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        image_metrics(np.array([0.1, np.nan]), np.array([0, 1]), 0.5)
    with pytest.raises(ValueError, match=r"found \[3\]"):
        image_metrics(np.array([0.1, 0.2]), np.array([0, 3]), 0.5)


# --- pixel_auroc -----------------------------------------------------------------------------------------


def test_pixel_auroc_agrees_with_sklearn_on_flattened_pixels():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 8, 8)) < 0.2
    maps = (rng.random((3, 8, 8)) + masks * 0.5).astype(np.float32)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_pixel_auroc_is_none_without_defect_or_without_background_pixels():
    maps = np.random.default_rng(1).random((2, 4, 4)).astype(np.float32)
    assert pixel_auroc(maps, np.zeros((2, 4, 4), dtype=bool)) is None
    assert pixel_auroc(maps, np.ones((2, 4, 4), dtype=bool)) is None


def test_pixel_inputs_of_different_shapes_are_an_error():
    with pytest.raises(ValueError, match="one shape"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match="one shape"):
        aupro(np.zeros((4, 4)), np.zeros((4, 4), dtype=bool))


def test_nan_in_maps_is_an_error():
    maps = np.zeros((1, 2, 2), dtype=np.float32)
    maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 anomaly-map pixels are NaN"):
        pixel_auroc(maps, np.eye(2, dtype=bool)[None])
    with pytest.raises(ValueError, match="NaN"):
        aupro(maps, np.eye(2, dtype=bool)[None])


# --- aupro -----------------------------------------------------------------------------------------------


def one_region_case():
    """1x4x4: one 2x2 region (top-left) and 12 background pixels.

    region scores 0.9 0.6 0.4 0.1; background 0.8, 0.4, 0.4 and nine at 0.0. Sorted descending, with
    (FPR, PRO) after each run of equal scores (12 background pixels, region area 4):
        0.9 R -> (0, 1/4)   0.8 B -> (1/12, 1/4)   0.6 R -> (1/12, 2/4)
        0.4 R B B -> (3/12, 3/4)   0.1 R -> (3/12, 1)   0.0 x9 B -> (1, 1)
    """
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, :2, :2] = True
    maps = np.zeros((1, 4, 4), dtype=np.float32)
    maps[0, :2, :2] = [[0.9, 0.6], [0.4, 0.1]]
    maps[0, 0, 3], maps[0, 3, 0], maps[0, 3, 3] = 0.8, 0.4, 0.4
    return maps, masks


def test_aupro_of_a_tiny_one_region_case_by_hand_at_max_fpr_0_3():
    # Area to 0.3: [0, 1/12] at 1/4 -> 1/48; [1/12, 3/12] trapezoid 1/2 -> 3/4: (5/8) * (2/12) = 5/48;
    # [3/12, 0.3] at 1: 1/20. Total 6/48 + 1/20 = 0.175; over 0.3 -> 7/12.
    maps, masks = one_region_case()
    assert aupro(maps, masks, max_fpr=0.3) == pytest.approx(7 / 12)


def test_aupro_interpolates_pro_at_max_fpr_inside_a_sloped_segment():
    # At 0.2, inside the (1/12, 1/2) -> (3/12, 3/4) segment: PRO = 1/2 + 1.5 * (0.2 - 1/12) = 0.675.
    # Area: 1/48 + (1/2 + 0.675) / 2 * (0.2 - 1/12) = 1/48 + 329/4800 = 429/4800; over 0.2 -> 429/960.
    maps, masks = one_region_case()
    assert aupro(maps, masks, max_fpr=0.2) == pytest.approx(429 / 960)


def test_aupro_of_a_perfect_map_is_one():
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:6, 3:9] = True
    masks[0, 10:12, 10:15] = True
    masks[2, 5:8, 5:8] = True
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)


def test_diagonal_neighbours_form_one_region():
    # Pixels (0,0) and (1,1) touch diagonally: one 8-connected region of area 2; (3,3) is a second region.
    # Scores: (0,0) 0.9; (1,1) and (3,3) 0.2; one background pixel 0.5; 12 background at 0.
    # Curve: 0.9 -> (0, (1/2)/2 = 1/4); 0.5 -> (1/13, 1/4); 0.2 -> (1/13, 1); 0 -> (1, 1).
    # Area to 0.3: (1/4)(1/13) + (0.3 - 1/13) = 0.3 - 0.75/13; over 0.3 -> 1 - 5/26 = 21/26.
    # (With 4-connectivity the three single-pixel regions would give 1 - (2/3) / 3.9 instead.)
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = True
    maps = np.zeros((1, 4, 4), dtype=np.float32)
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 3, 3], maps[0, 0, 3] = 0.9, 0.2, 0.2, 0.5
    assert aupro(maps, masks) == pytest.approx(21 / 26)


def aupro_by_threshold_loop(maps, masks, max_fpr):
    """Slow, obvious reference: one (FPR, PRO) point per distinct score, regions measured one by one."""
    regions = []
    for image_index, mask in enumerate(masks):
        n_labels, region_of_pixel = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        regions += [(image_index, region_of_pixel == label) for label in range(1, n_labels)]
    background = ~masks
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        rejected = maps >= threshold
        fpr = np.count_nonzero(rejected & background) / np.count_nonzero(background)
        pro = np.mean([rejected[i][region].mean() for i, region in regions])
        points.append((fpr, pro))
    fpr, pro = np.array(points).T
    inside = fpr <= max_fpr
    # np.interp is exact inside a sloped segment; on a vertical jump the cut adds zero width either way.
    x = np.append(fpr[inside], max_fpr)
    y = np.append(pro[inside], np.interp(max_fpr, fpr, pro))
    return np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / max_fpr


@pytest.mark.parametrize("max_fpr", [0.05, 0.3, 1.0])
def test_aupro_matches_a_threshold_loop_on_random_maps_with_several_regions(max_fpr):
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 24, 24), dtype=bool)
    masks[0, 2:5, 2:9] = True
    masks[0, 15:22, 18:20] = True
    masks[1, 10:11, 3:4] = True
    masks[3, 5:20, 5:20] = True
    maps = (rng.random(masks.shape) + masks * 0.4).round(2).astype(np.float32)  # rounded: ties
    assert aupro(maps, masks, max_fpr=max_fpr) == pytest.approx(aupro_by_threshold_loop(maps, masks, max_fpr))


def test_aupro_is_none_without_regions_or_without_background():
    maps = np.random.default_rng(4).random((2, 4, 4)).astype(np.float32)
    assert aupro(maps, np.zeros((2, 4, 4), dtype=bool)) is None
    assert aupro(maps, np.ones((2, 4, 4), dtype=bool)) is None


@pytest.mark.parametrize("max_fpr", [0.0, -0.1, 1.5])
def test_aupro_rejects_max_fpr_out_of_range(max_fpr):
    maps, masks = one_region_case()
    with pytest.raises(ValueError, match="max_fpr"):
        aupro(maps, masks, max_fpr=max_fpr)


# --- split_metrics ---------------------------------------------------------------------------------------


def make_split(*, with_masks):
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[2, 2:5, 2:5] = True
    maps = np.random.default_rng(5).random((3, 8, 8)).astype(np.float32) + masks
    return SplitScores(
        name="test",
        paths=("good/0.png", "good/1.png", "crack/0.png"),
        images=np.zeros((3, 8, 8, 3), dtype=np.uint8),
        labels=np.array([0, 0, 1]),
        defect_types=("good", "good", "crack"),
        scores=np.array([0.1, 0.2, 0.9], dtype=np.float32),
        maps=maps,
        masks=masks if with_masks else None,
    )


def test_split_metrics_adds_pixel_metrics_when_the_split_has_masks():
    split = make_split(with_masks=True)
    metrics = split_metrics(split, 0.5)
    assert metrics["image_auroc"] == 1.0
    assert metrics["pixel_auroc"] == pytest.approx(pixel_auroc(split.maps, split.masks))
    assert metrics["aupro"] == pytest.approx(aupro(split.maps, split.masks))
    json.dumps(metrics, allow_nan=False)


def test_split_metrics_without_masks_has_only_image_metrics():
    metrics = split_metrics(make_split(with_masks=False), 0.5)
    assert "pixel_auroc" not in metrics
    assert "aupro" not in metrics
    assert metrics["confusion"] == {"tn": 2, "fp": 0, "fn": 0, "tp": 1}


# --- defect_type_metrics ---------------------------------------------------------------------------------


def test_each_defect_type_has_its_escapes_recall_and_auroc_against_all_goods():
    scores = np.array([0.1, 0.3, 0.6, 0.9, 0.8, 0.2, 0.4, 0.7])
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    types = ("good", "good", "good", "crack", "crack", "stain", "stain", "stain")
    metrics = defect_type_metrics(scores, labels, types, 0.5)
    assert list(metrics) == ["crack", "stain"]
    assert metrics["crack"] == {"n": 2, "escapes": 0, "recall": 1.0, "image_auroc": 1.0}
    # stain 0.2, 0.4, 0.7 against goods 0.1, 0.3, 0.6: 1 + 2 + 3 of 9 pairs ranked right
    assert metrics["stain"] == {
        "n": 3,
        "escapes": 2,
        "recall": pytest.approx(1 / 3),
        "image_auroc": pytest.approx(6 / 9),
    }
    json.dumps(metrics, allow_nan=False)


def test_defect_types_of_goods_are_ignored_and_a_split_without_goods_has_no_auroc():
    metrics = defect_type_metrics(np.array([0.9, 0.2]), np.array([1, 1]), ("crack", "crack"), 0.5)
    assert metrics == {"crack": {"n": 2, "escapes": 1, "recall": 0.5, "image_auroc": None}}
    assert defect_type_metrics(np.array([0.9]), np.array([0]), ("odd",), 0.5) == {}


def test_defect_types_must_match_the_scores():
    with pytest.raises(ValueError, match="one type per score"):
        defect_type_metrics(np.array([0.1, 0.9]), np.array([0, 1]), ("good",), 0.5)


def test_split_metrics_breaks_recall_down_by_defect_type():
    metrics = split_metrics(make_split(with_masks=False), 0.5)
    assert metrics["by_defect_type"] == {"crack": {"n": 1, "escapes": 0, "recall": 1.0, "image_auroc": 1.0}}
