"""Score-level ensemble of finished `lineguard-train run` folders: is a mix of model kinds worth building?

Each member's calibration and test scores (RUN/scores/{calibration,test}.npz) are normalised by that
member's calibration-good scores (z = (s - mean) / std), then summed; the threshold is chosen on the
summed calibration scores exactly as `--threshold fpr:RATE` chooses it. Prints each member and the sum.

    .venv/bin/python bench/ensemble_scores.py RUN_A RUN_B [--rate 0.05]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from lineguard.trainer.calibrate import ThresholdMethod, choose_threshold

SPLITS = ("calibration", "test")


def load(run: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """split -> (paths, labels, scores), in path order so members line up."""
    out = {}
    for split in SPLITS:
        with np.load(run / "scores" / f"{split}.npz") as saved:
            order = np.argsort(saved["paths"])
            out[split] = (saved["paths"][order], saved["labels"][order], saved["scores"][order].astype(np.float64))
    return out


def report(name: str, scores: dict[str, np.ndarray], labels: dict[str, np.ndarray], rate: float) -> None:
    threshold = choose_threshold(scores["calibration"], labels["calibration"], ThresholdMethod("fpr", rate))
    test, y = scores["test"], labels["test"]
    print(
        f"{name:<40} cal {roc_auc_score(labels['calibration'], scores['calibration']):.4f}  "
        f"test {roc_auc_score(y, test):.4f}  recall {np.mean(test[y == 1] >= threshold):.3f}  "
        f"fpr {np.mean(test[y == 0] >= threshold):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--rate", type=float, default=0.05)
    args = parser.parse_args()
    members = [load(run) for run in args.runs]
    labels = {s: members[0][s][1] for s in SPLITS}
    for member in members[1:]:
        for s in SPLITS:
            if not np.array_equal(member[s][0], members[0][s][0]):
                msg = f"runs do not score the same {s} images; use one dataset and seed"
                raise SystemExit(msg)
    total = {s: np.zeros(len(labels[s])) for s in SPLITS}
    for run, member in zip(args.runs, members, strict=True):
        raw = {s: member[s][2] for s in SPLITS}
        report(run.name, raw, labels, args.rate)
        good = raw["calibration"][labels["calibration"] == 0]
        for s in SPLITS:
            total[s] += (raw[s] - good.mean()) / (good.std() + 1e-12)
    report("sum of z-scores", total, labels, args.rate)


if __name__ == "__main__":
    main()
