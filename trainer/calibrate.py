"""Choose the accept/reject threshold on image scores and state its error rates with confidence intervals.

A part is rejected iff `score >= threshold`; label 1 = nok (defect, the positive class), 0 = ok (good).
Chosen thresholds do not sit on a sample score: they are midpoints between consecutive distinct scores,
or one ulp (of the scores' own float type) outside the lowest/highest score, so no calibration image's
verdict hinges on a score equal to the threshold. Two adjacent floats, with nothing between, get the upper.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np
from scipy.stats import binomtest

from .errors import CalibrationError

log = logging.getLogger(__name__)

MethodKind = Literal["f1", "youden", "fpr", "recall", "manual"]
_KINDS: tuple[str, ...] = get_args(MethodKind)
_KINDS_WITH_VALUE = ("fpr", "recall", "manual")
VALID_FORMS = "f1, youden, fpr:<rate> (0 <= rate < 1), recall:<rate> (0 < rate <= 1), manual:<threshold>"


@dataclass(frozen=True, slots=True)
class ThresholdMethod:
    """How to choose the threshold.

    value: the false-reject rate for "fpr" (0 <= v < 1), the recall for "recall" (0 < v <= 1),
        the threshold itself for "manual"; None for "f1" and "youden".
    """

    kind: MethodKind
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            msg = f"threshold method kind {self.kind!r} is unknown; valid forms: {VALID_FORMS}"
            raise CalibrationError(msg)
        if self.kind not in _KINDS_WITH_VALUE:
            if self.value is not None:
                msg = f"threshold method {self.kind!r} takes no value (got {self.value!r}); use {self.kind!r}"
                raise CalibrationError(msg)
            return
        if self.value is None or not math.isfinite(self.value):
            msg = f"threshold method {self.kind!r} needs a finite value, got {self.value!r}: {VALID_FORMS}"
            raise CalibrationError(msg)
        object.__setattr__(self, "value", float(self.value))  # 0 -> 0.0, np.float64 -> float: str round-trips
        if self.kind == "fpr" and not 0.0 <= self.value < 1.0:
            msg = f"fpr:{self.value} is out of range; the rate needs 0 <= rate < 1, e.g. fpr:0.01"
            raise CalibrationError(msg)
        if self.kind == "recall" and not 0.0 < self.value <= 1.0:
            msg = f"recall:{self.value} is out of range; the rate needs 0 < rate <= 1, e.g. recall:0.99"
            raise CalibrationError(msg)

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value!r}"

    @property
    def required_value(self) -> float:
        """The value of "fpr", "recall" and "manual" (set and checked at construction); CalibrationError otherwise."""
        if self.value is None:
            msg = f"threshold method {self.kind!r} takes no value"
            raise CalibrationError(msg)
        return self.value


def parse_threshold_method(text: str) -> ThresholdMethod:
    """Parse "f1", "youden", "fpr:<rate>", "recall:<rate>" or "manual:<value>" (outer spaces ignored)."""
    kind, sep, value_text = text.strip().partition(":")
    kind = kind.strip().lower()
    bad = f"threshold method {text!r} is not valid; valid forms: {VALID_FORMS}"
    if kind not in _KINDS or bool(sep) != (kind in _KINDS_WITH_VALUE):
        raise CalibrationError(bad)
    if not sep:
        return ThresholdMethod(kind)  # type: ignore[arg-type]  # narrowed by the check above
    try:
        value = float(value_text)
    except ValueError:
        raise CalibrationError(bad) from None
    if not math.isfinite(value):
        raise CalibrationError(bad)
    return ThresholdMethod(kind, value)  # type: ignore[arg-type]


def _checked(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return scores as (N,) float64 and labels as (N,) int64, or raise CalibrationError."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.ndim != 1:
        msg = f"scores and labels must be 1-D, got shapes {scores.shape} and {labels.shape}"
        raise CalibrationError(msg)
    if len(scores) == 0:
        msg = "the calibration split is empty: no scores to choose a threshold from; add calibration images"
        raise CalibrationError(msg)
    if len(scores) != len(labels):
        msg = f"{len(scores)} scores but {len(labels)} labels; each calibration image needs one of each"
        raise CalibrationError(msg)
    n_bad = int(np.count_nonzero(~np.isfinite(scores)))
    if n_bad:
        msg = f"{n_bad} of {len(scores)} calibration scores are NaN or infinite; the model output is broken"
        raise CalibrationError(msg)
    bad_labels = np.setdiff1d(np.unique(labels), [0, 1])
    if bad_labels.size:
        msg = f"labels must be 0 (ok) or 1 (nok), found {bad_labels.tolist()}"
        raise CalibrationError(msg)
    return scores, labels.astype(np.int64)


def _candidates(scores: np.ndarray, native: np.dtype) -> np.ndarray:
    """Candidate thresholds, ascending: below the min, midpoints of distinct neighbours, above the max.

    scores: (N,) float64. native: the float type the scores came in (float32 from the models). The steps
    below/above a score are one ulp in that type, so each candidate keeps its verdicts when cast back to
    it: numpy compares a float32 array with a Python float in float32.
    """
    distinct = np.unique(scores)
    one_up = np.nextafter(distinct.astype(native), np.array(np.inf, dtype=native)).astype(np.float64)
    one_down = np.nextafter(distinct[:1].astype(native), np.array(-np.inf, dtype=native)).astype(np.float64)
    # Two adjacent floats have no midpoint strictly between them: take the upper one (verdicts stay right).
    mid = np.maximum((distinct[:-1] + distinct[1:]) / 2, one_up[:-1])
    return np.concatenate((one_down, mid, one_up[-1:]))


def _count_at_or_above(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of sorted_values are >= each threshold: (T,) int64."""
    return len(sorted_values) - np.searchsorted(sorted_values, thresholds, side="left")


def _missing_class(method: ThresholdMethod, n_good: int, n_defect: int) -> str | None:
    """Why `method` cannot run on this class balance, or None if it can."""
    kind = method.kind
    if kind in ("f1", "youden") and (n_good == 0 or n_defect == 0):
        return (
            f"threshold '{method}' needs good and defect calibration images; the calibration split has "
            f"{n_good} goods and {n_defect} defects: add the missing images or use fpr:<rate>"
        )
    if kind == "fpr" and n_good == 0:
        return f"threshold '{method}' needs good calibration images; the calibration split has 0 goods: add good images"
    if kind == "recall" and n_defect == 0:
        return (
            f"threshold '{method}' needs defect calibration images; the calibration split has 0 defects: "
            "add defect images or use fpr:<rate>"
        )
    return None


def choose_threshold(scores: np.ndarray, labels: np.ndarray, method: ThresholdMethod) -> float:
    """The threshold that `method` picks on the calibration scores.

    scores: (N,) float image anomaly scores; labels: (N,) int, 0 = ok, 1 = nok.
    """
    native = np.asarray(scores).dtype
    native = native if np.issubdtype(native, np.floating) else np.dtype(np.float64)
    scores, labels = _checked(scores, labels)
    good = np.sort(scores[labels == 0])
    defect = np.sort(scores[labels == 1])
    problem = _missing_class(method, len(good), len(defect))
    if problem:
        raise CalibrationError(problem)
    if method.kind == "manual":
        return method.required_value
    thresholds = _candidates(scores, native)  # ascending: argmax on the reversed array takes the highest tie
    false_rejects = _count_at_or_above(good, thresholds)
    caught = _count_at_or_above(defect, thresholds)
    if method.kind == "f1":
        escapes = len(defect) - caught
        f1 = 2 * caught / (2 * caught + false_rejects + escapes)  # denominator > 0: defects exist
        best = len(thresholds) - 1 - int(np.argmax(f1[::-1]))
    elif method.kind == "youden":
        # TPR - FPR scaled by n_good * n_defect: exact integers, so ties are ties.
        youden = caught * len(good) - false_rejects * len(defect)
        best = len(thresholds) - 1 - int(np.argmax(youden[::-1]))
    elif method.kind == "fpr":
        # The last candidate (above the max) has no false rejects, so one always qualifies.
        best = int(np.argmax(false_rejects / len(good) <= method.required_value))
    else:  # recall; the first candidate (below the min) catches every defect, so one always qualifies.
        best = int(np.nonzero(caught / len(defect) >= method.required_value)[0][-1])
    return float(thresholds[best])


@dataclass(frozen=True, slots=True)
class RateEstimate:
    """count / total with a two-sided Clopper-Pearson ("exact") confidence interval [low, high]."""

    count: int
    total: int
    rate: float
    low: float
    high: float

    @classmethod
    def from_counts(cls, count: int, total: int, *, confidence: float) -> RateEstimate:
        """Estimate from `count` events in `total` trials (total >= 1)."""
        interval = binomtest(count, total).proportion_ci(confidence_level=confidence, method="exact")
        return cls(int(count), int(total), count / total, float(interval.low), float(interval.high))


@dataclass(frozen=True, slots=True)
class Calibration:
    """The chosen threshold and what it does on the calibration split.

    false_reject: goods with score >= threshold, over goods.
    escape: defects with score < threshold, over defects; None when the split has no defects.
    """

    method: str
    threshold: float
    n_good: int
    n_defect: int
    false_reject: RateEstimate
    escape: RateEstimate | None
    confidence: float

    def to_dict(self) -> dict:
        """JSON-ready: plain ints and floats, the estimates as nested dicts."""
        return asdict(self)


def calibrate(
    scores: np.ndarray, labels: np.ndarray, method: ThresholdMethod, *, confidence: float = 0.95
) -> Calibration:
    """Choose the threshold with `method` and estimate its false-reject and escape rates.

    scores: (N,) float image anomaly scores; labels: (N,) int, 0 = ok, 1 = nok; needs at least one good.
    confidence: level of the two-sided Clopper-Pearson intervals, 0 < confidence < 1.
    """
    if not 0.0 < confidence < 1.0:
        msg = f"confidence {confidence!r} is out of range; use 0 < confidence < 1, e.g. 0.95"
        raise CalibrationError(msg)
    threshold = choose_threshold(scores, labels, method)  # on the scores as given: it steps in their dtype
    scores, labels = _checked(scores, labels)
    good = scores[labels == 0]
    defect = scores[labels == 1]
    if len(good) == 0:
        msg = (
            f"calibration needs good images to estimate the false-reject rate; the calibration split has "
            f"0 goods and {len(defect)} defects: add good images"
        )
        raise CalibrationError(msg)
    false_reject = RateEstimate.from_counts(int(np.count_nonzero(good >= threshold)), len(good), confidence=confidence)
    escape = None
    if len(defect):
        escape = RateEstimate.from_counts(int(np.count_nonzero(defect < threshold)), len(defect), confidence=confidence)
    log.info(
        "threshold %s = %.6g: %d/%d goods rejected, %s defects escaped",
        method,
        threshold,
        false_reject.count,
        false_reject.total,
        f"{escape.count}/{escape.total}" if escape else "no",
    )
    return Calibration(str(method), threshold, len(good), len(defect), false_reject, escape, float(confidence))
