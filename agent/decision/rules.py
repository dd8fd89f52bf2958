"""The decision rule as pure functions: threshold, minimum defect area, and the fail-safe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

VerdictKind = Literal["accept", "reject", "failsafe"]


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: VerdictKind
    reason: str


def decide(score: float, anomaly_map: np.ndarray | None, *, threshold: float, min_defect_area_px: int) -> Decision:
    """Reject iff score >= threshold and, when a minimum area is set, enough map pixels reach it.

    anomaly_map: (H, W) float32 or None; required when min_defect_area_px > 0.
    """
    if not np.isfinite(score):
        return Decision("failsafe", f"score is {score}: the model produced no usable number")
    if score < threshold:
        return Decision("accept", f"score {score:.4g} < threshold {threshold:.4g}")
    if min_defect_area_px > 0:
        if anomaly_map is None:
            return Decision("failsafe", "minimum defect area is set but no anomaly map arrived")
        area = int(np.count_nonzero(anomaly_map >= threshold))
        if area < min_defect_area_px:
            return Decision(
                "accept", f"score {score:.4g} >= {threshold:.4g} but defect area {area} px < {min_defect_area_px} px"
            )
        return Decision("reject", f"score {score:.4g} >= threshold {threshold:.4g}, defect area {area} px")
    return Decision("reject", f"score {score:.4g} >= threshold {threshold:.4g}")


def rows_needing_maps(scores: np.ndarray, *, threshold: float, min_defect_area_px: int, heatmap: str) -> list[int]:
    """Batch rows whose anomaly map `decide` or the heatmap will read; the engine copies out only these.

    scores: (N,) float32. Heatmaps of "all" or "every-nth" frames need every map (decision counts
    the frames, so the engine cannot tell which is the nth); otherwise only rows at or above the
    threshold, when heatmaps of rejects are published or a minimum defect area is set.
    """
    if heatmap in ("all", "every-nth"):
        return list(range(len(scores)))
    if heatmap == "rejects" or min_defect_area_px > 0:
        return [int(row) for row in np.flatnonzero(np.asarray(scores) >= threshold)]
    return []
