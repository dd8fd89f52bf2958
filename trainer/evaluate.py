"""Image- and pixel-level metrics of a scored split at a given threshold; every value is JSON-ready.

A part is rejected iff `score >= threshold`; label 1 = nok (defect, the positive class), 0 = ok (good).
Ratios that are undefined (0/0) and AUROCs on a split with one class are None, never NaN.
Bad inputs (shapes, labels, NaN) are programming errors of the caller and raise ValueError.
"""

from __future__ import annotations

import logging
from typing import cast

import cv2
import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from .scoring import SplitScores

log = logging.getLogger(__name__)


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _check_image_inputs(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return scores as (N,) float64 and labels as (N,) bool (True = nok), or raise ValueError."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or scores.shape != labels.shape or len(scores) == 0:
        msg = f"scores and labels must be non-empty 1-D arrays of one length: {scores.shape}, {labels.shape}"
        raise ValueError(msg)
    if not np.isfinite(scores).all():
        msg = f"{np.count_nonzero(~np.isfinite(scores))} of {len(scores)} scores are NaN or infinite"
        raise ValueError(msg)
    bad_labels = np.setdiff1d(np.unique(labels), [0, 1])
    if bad_labels.size:
        msg = f"labels must be 0 (ok) or 1 (nok), found {bad_labels.tolist()}"
        raise ValueError(msg)
    return scores, labels == 1


def image_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, object]:
    """Accept/reject quality at `threshold` and the threshold-free AUROC and average precision.

    scores: (N,) float image anomaly scores; labels: (N,) int, 0 = ok, 1 = nok.
    "fpr" is the false-reject rate of the goods; "confusion" holds int counts tn, fp, fn, tp.
    """
    scores, is_defect = _check_image_inputs(scores, labels)
    rejected = scores >= threshold
    tp = int(np.count_nonzero(rejected & is_defect))
    fp = int(np.count_nonzero(rejected & ~is_defect))
    fn = int(np.count_nonzero(~rejected & is_defect))
    tn = int(np.count_nonzero(~rejected & ~is_defect))
    both_classes = 0 < tp + fn < len(scores)
    return {
        "image_auroc": float(roc_auc_score(is_defect, scores)) if both_classes else None,
        "average_precision": float(average_precision_score(is_defect, scores)) if both_classes else None,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, len(scores)),
        "fpr": _ratio(fp, fp + tn),
        "threshold": float(threshold),
        "n_good": fp + tn,
        "n_defect": tp + fn,
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def _check_pixel_inputs(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return maps as (N, H, W) float32 and masks as (N, H, W) bool (no copies when already so)."""
    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks).astype(bool, copy=False)
    if maps.ndim != 3 or maps.shape != masks.shape:
        msg = f"maps and masks must both be (N, H, W) of one shape, got {maps.shape} and {masks.shape}"
        raise ValueError(msg)
    if np.isnan(maps).any():
        msg = f"{np.count_nonzero(np.isnan(maps))} anomaly-map pixels are NaN; the model output is broken"
        raise ValueError(msg)
    return maps, masks


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float | None:
    """AUROC over all pixels of all images; None when the masks lack defect or background pixels.

    maps: (N, H, W) float anomaly maps; masks: (N, H, W) bool, True = defect pixel.
    """
    maps, masks = _check_pixel_inputs(maps, masks)
    n_defect_px = int(np.count_nonzero(masks))
    if n_defect_px in (0, masks.size):
        return None
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per pixel 1 / (area of its 8-connected defect region), else 0: (N*H*W,) float64; the region count."""
    weights = np.zeros(masks.size, dtype=np.float64)
    per_image = weights.reshape(masks.shape)
    n_regions = 0
    for mask, image_weights in zip(masks, per_image, strict=True):
        if not mask.any():
            continue
        n_labels, region_of_pixel = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        area = np.bincount(region_of_pixel.ravel(), minlength=n_labels)
        inverse_area = np.zeros(n_labels, dtype=np.float64)  # label 0, the background, keeps weight 0
        inverse_area[1:] = 1.0 / area[1:]
        image_weights[...] = inverse_area[region_of_pixel]
        n_regions += n_labels - 1
    return weights, n_regions


def aupro(maps: np.ndarray, masks: np.ndarray, *, max_fpr: float = 0.3) -> float | None:
    """Area under the per-region-overlap curve for FPR in [0, max_fpr], divided by max_fpr (MVTec AD).

    maps: (N, H, W) float anomaly maps; masks: (N, H, W) bool; regions are 8-connected components per image.
    FPR counts all non-defect pixels. None when the masks hold no region or no background pixel.
    One sort of all pixels, O(P log P), instead of a loop over thresholds.
    """
    if not 0.0 < max_fpr <= 1.0:
        msg = f"max_fpr must be in (0, 1], got {max_fpr!r}"
        raise ValueError(msg)
    maps, masks = _check_pixel_inputs(maps, masks)
    weights, n_regions = _region_weights(masks)
    n_background = masks.size - int(np.count_nonzero(masks))
    if n_regions == 0 or n_background == 0:
        return None
    scores = maps.ravel()
    order = np.argsort(scores)[::-1]  # descending; order inside ties does not matter
    sorted_scores = scores[order]
    # A threshold sits between runs of equal scores: keep the curve point at the last pixel of each run.
    run_ends = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    del sorted_scores
    background_sorted = ~masks.ravel()[order]
    fpr = np.concatenate(([0.0], np.cumsum(background_sorted, dtype=np.int64)[run_ends] / n_background))
    del background_sorted
    weights_sorted = weights[order]
    del weights, order
    np.cumsum(weights_sorted, out=weights_sorted)
    pro = np.concatenate(([0.0], weights_sorted[run_ends] / n_regions))
    return _normalised_area(fpr, pro, max_fpr)


def _normalised_area(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Trapezoid area under (fpr, pro) from 0 to max_fpr, over max_fpr; fpr ascending from 0 to 1."""
    n_inside = int(np.searchsorted(fpr, max_fpr, side="right"))  # points with fpr <= max_fpr
    x, y = fpr[:n_inside], pro[:n_inside]
    if n_inside < len(fpr):  # close the curve at max_fpr: fpr[n_inside - 1] <= max_fpr < fpr[n_inside]
        x0, x1 = fpr[n_inside - 1], fpr[n_inside]
        y0, y1 = pro[n_inside - 1], pro[n_inside]
        x = np.append(x, max_fpr)
        y = np.append(y, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0))
    area = np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2
    return float(area / max_fpr)


def defect_type_metrics(
    scores: np.ndarray, labels: np.ndarray, defect_types: tuple[str, ...], threshold: float
) -> dict[str, dict[str, object]]:
    """Which kinds of defect escape: per defect type (sorted), its images, escapes and recall at `threshold`,
    and the AUROC of that type against every good image of the split (None without goods).

    defect_types: the folder or CSV class of each image; only those of defect images (label 1) are used.
    """
    scores, is_defect = _check_image_inputs(scores, labels)
    types = np.asarray(defect_types, dtype=str)
    if types.shape != scores.shape:
        msg = f"defect_types must give one type per score: {types.shape} against {scores.shape}"
        raise ValueError(msg)
    out: dict[str, dict[str, object]] = {}
    for defect_type in sorted(set(types[is_defect].tolist())):
        these = ~is_defect | (types == defect_type)  # every good image, and this type's defects
        metrics = image_metrics(scores[these], is_defect[these].astype(int), threshold)
        out[defect_type] = {
            "n": metrics["n_defect"],
            "escapes": cast("dict[str, int]", metrics["confusion"])["fn"],
            "recall": metrics["recall"],
            "image_auroc": metrics["image_auroc"],
        }
    return out


def split_metrics(split: SplitScores, threshold: float) -> dict[str, object]:
    """image_metrics of the split, "by_defect_type" (defect_type_metrics) when it has defects, and
    "pixel_auroc" and "aupro" when it has masks."""
    metrics = image_metrics(split.scores, split.labels, threshold)
    if metrics["n_defect"]:
        metrics["by_defect_type"] = defect_type_metrics(split.scores, split.labels, split.defect_types, threshold)
    if split.masks is not None:
        metrics["pixel_auroc"] = pixel_auroc(split.maps, split.masks)
        metrics["aupro"] = aupro(split.maps, split.masks)
    log.info(
        "split %s at threshold %.6g: image AUROC %s, F1 %s, pixel AUROC %s, AUPRO %s",
        split.name,
        threshold,
        metrics["image_auroc"],
        metrics["f1"],
        metrics.get("pixel_auroc"),
        metrics.get("aupro"),
    )
    return metrics
