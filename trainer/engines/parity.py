"""Does a built engine score like ONNX Runtime? Golden scores within the precision's tolerance, no verdict changed.

Plain numpy on score arrays, so the rule is tested without TensorRT; `score_all` runs any
agent back end (the TensorRT one at build time) over images in batches it accepts.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from lineguard.agent.bundle import EngineParity
from lineguard.agent.engine.backends import Backend

from ..errors import EngineBuildError

Precision = Literal["fp32", "fp16", "int8"]

# Relative score tolerance against ONNX Runtime (CPU, float32) on the golden images.
SCORE_RTOL: dict[str, float] = {"fp32": 1e-3, "fp16": 1e-2, "int8": 5e-2}


def score_all(backend: Backend, images: np.ndarray, *, max_batch: int) -> np.ndarray:
    """(N,) float32 scores of (N, H, W, C) uint8 images, max_batch at a time."""
    if len(images) == 0:
        return np.empty(0, np.float32)
    return np.concatenate([backend.infer(images[i : i + max_batch]).scores for i in range(0, len(images), max_batch)])


def engine_parity(
    *,
    precision: Precision,
    golden_expected: np.ndarray,
    golden_scores: np.ndarray,
    reference_scores: np.ndarray,
    engine_scores: np.ndarray,
    threshold: float,
) -> EngineParity:
    """Compare the engine with ONNX Runtime; EngineBuildError past tolerance or on any changed verdict.

    golden_expected, golden_scores: (G,) the manifest's expected scores and the engine's.
    reference_scores, engine_scores: (M,) ONNX Runtime's and the engine's scores on the verdict
    set (golden and calibration images); a verdict is reject iff score >= threshold.
    """
    if golden_scores.shape != golden_expected.shape or engine_scores.shape != reference_scores.shape:
        msg = f"score arrays differ in shape: {golden_scores.shape} vs {golden_expected.shape}, {engine_scores.shape} vs {reference_scores.shape}"
        raise EngineBuildError(msg)
    rtol = SCORE_RTOL[precision]
    if not (np.all(np.isfinite(golden_scores)) and np.all(np.isfinite(engine_scores))):
        msg = f"the {precision} engine gives non-finite scores (NaN or inf); it overflows at this precision: build fp32"
        raise EngineBuildError(msg)
    relative = np.abs(golden_scores - golden_expected) / np.maximum(np.abs(golden_expected), np.finfo(np.float32).tiny)
    worst = float(relative.max()) if len(relative) else 0.0
    changed = np.flatnonzero((reference_scores >= threshold) != (engine_scores >= threshold))
    parity = EngineParity(
        n_golden=len(golden_scores),
        max_score_rel_diff=worst,
        score_rtol=rtol,
        n_verdicts=len(engine_scores),
        verdicts_changed=len(changed),
    )
    if worst > rtol or len(changed):
        flips = ", ".join(f"image {i}: {reference_scores[i]:.4g} -> {engine_scores[i]:.4g}" for i in changed[:5])
        msg = (
            f"the {precision} engine does not match ONNX Runtime: golden scores differ by up to {worst:.2e} relative "
            f"(limit {rtol:.0e}), {len(changed)} of {len(engine_scores)} verdicts change at threshold {threshold:.4g}"
            f"{' (' + flips + ')' if flips else ''}; build with --search-precision fp32, or at a higher precision"
        )
        raise EngineBuildError(msg)
    return parity
