"""What to try when a model separates good from defect parts less well than a line needs.

The report shows these lines when the calibration image AUROC is below ADVICE_BELOW_AUROC. Each
option says what it changes and what it did on the real development set (ELPV mono-crystalline
solar cells, BENCHMARKS.md "Accuracy on real parts"), so a user tries the cheap, likely ones first
and compares them with `lineguard-train compare` (the `patchcore-*` rows) before picking one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

ADVICE_BELOW_AUROC = 0.97  # below this calibration AUROC, about 1 defect in 7 escapes at a 5 % false-reject rate


@dataclass(frozen=True, slots=True)
class Suggestion:
    """One option to try: when it applies (model kind, its saved config) and what it is and did."""

    applies: Callable[[str, Mapping[str, Any]], bool]
    text: str


SUGGESTIONS = (
    Suggestion(
        lambda kind, config: kind == "patchcore" and config.get("regions", 1) == 1,
        "Parts in a fixture, camera fixed: try the position-aware bank, `--regions 2` (each quarter of the image "
        "is compared only with good patches from the same place, so a feature that is normal elsewhere but out of "
        "place is caught). On ELPV cells, where defects are not about position, it did not help: "
        "see BENCHMARKS.md.",
    ),
    Suggestion(
        lambda kind, config: config.get("backbone") != "efficientnet-lite2",
        "A larger backbone: `--backbone efficientnet-lite2` (about 1.4x the feature cost). On ELPV cells see "
        "BENCHMARKS.md for its measured effect.",
    ),
    Suggestion(
        lambda kind, config: config.get("input_height", 0) < 320,
        "A larger input for small or thin defects: `--image-size 320` (or the camera's ROI size, rounded to a "
        "multiple of 32); cost grows with the pixel count. On ELPV cells it did not help at the same bank size.",
    ),
    Suggestion(
        lambda kind, config: kind != "patchcore",
        "PatchCore (`--model patchcore`) needs no epochs and was the most accurate model on every dataset measured.",
    ),
)


def advice(kind: str, config: Mapping[str, Any], calibration_auroc: float | None) -> list[str]:
    """Report lines for a model (kind, saved config) whose calibration AUROC is low; [] when it is high or unknown."""
    if calibration_auroc is None or calibration_auroc >= ADVICE_BELOW_AUROC:
        return []
    head = (
        f"Calibration image AUROC is {calibration_auroc:.3f}, below {ADVICE_BELOW_AUROC}: at a low false-reject "
        "rate many defects will escape. Options to try, then compare them with `lineguard-train compare`:"
    )
    return [head, *(s.text for s in SUGGESTIONS if s.applies(kind, config))]
