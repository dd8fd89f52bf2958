"""What to try when a model separates good from defect parts less well than a line needs.

The report shows these lines when the calibration image AUROC is below ADVICE_BELOW_AUROC. Each
option says what it changes and what it did on the real development set (ELPV mono-crystalline
solar cells, BENCHMARKS.md "Accuracy on real parts"), so a user knows what to try and compares
the candidates with `lineguard-train compare` (the `patchcore-regions` row) before picking one.
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


# Measured on ELPV mono cells with the defaults otherwise (calibration / test image AUROC; defaults 0.915 / 0.964).
SUGGESTIONS = (
    Suggestion(
        lambda kind, config: kind == "patchcore" and config.get("regions", 1) == 1,
        "Parts in a fixture, camera fixed: `--regions 2`, the position-aware bank (a patch is compared only with "
        "good patches from its own quarter of the image, so what is normal elsewhere but out of place is caught; "
        "4x the bank, the same search per patch). ELPV cells: 0.927 / 0.953, fit about 4x longer.",
    ),
    Suggestion(
        lambda kind, config: kind == "patchcore" and config.get("max_bank_size", 4096) < 16384,
        "Rare good patterns flagged as defects: a larger bank, `--bank-size 16384` (the search, most of the "
        "scoring time, grows with it). ELPV cells: 0.927 / 0.959.",
    ),
    Suggestion(
        lambda kind, config: config.get("backbone") == "efficientnet-lite0",
        "Another backbone: `--backbone efficientnet-lite1` (about the same cost). ELPV cells: 0.921 / 0.954; "
        "lite2 was lower on both (0.911 / 0.947).",
    ),
    Suggestion(
        lambda kind, config: config.get("input_height", 0) < 320,
        "Defects a few pixels wide: a larger input, `--image-size 320` (cost grows with the pixel count). "
        "ELPV cells: 0.917 / 0.952.",
    ),
    Suggestion(
        lambda kind, config: kind != "patchcore",
        "PatchCore (`--model patchcore`) needs no epochs and was the most accurate model on every dataset measured.",
    ),
)

# Not a model option: where to look first. Measured with bench/elpv_by_confidence.py (BENCHMARKS.md, round five).
BY_DEFECT_TYPE = (
    "Which defects escape: with defect images in one folder per kind (test/crack, test/stain, ...), the report's "
    "\"Defects by type\" gives each kind's recall and AUROC. ELPV cells sorted by the experts' confidence: the "
    "defects they marked 2/3 likely were caught 45 % of the time on test (AUROC 0.896), the certain ones 87 % "
    "(AUROC 0.977); relabelling or more examples of one kind can matter more than another model."
)


def advice(kind: str, config: Mapping[str, Any], calibration_auroc: float | None) -> list[str]:
    """Report lines for a model (kind, saved config) whose calibration AUROC is low; [] when it is high or unknown."""
    if calibration_auroc is None or calibration_auroc >= ADVICE_BELOW_AUROC:
        return []
    head = (
        f"Calibration image AUROC is {calibration_auroc:.3f}, below {ADVICE_BELOW_AUROC}: at a low false-reject "
        "rate many defects will escape. Options to try, with their calibration / test AUROC on real solar-cell "
        "images (defaults 0.915 / 0.964; none beat the defaults on both there, so measure them on your parts with "
        "`lineguard-train compare`):"
    )
    return [head, *(s.text for s in SUGGESTIONS if s.applies(kind, config)), BY_DEFECT_TYPE]
