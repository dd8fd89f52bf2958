"""The ELPV development set with its defects sorted by the experts' confidence, as defect types.

`../shared/data/elpv_mono.py` puts every defect with probability >= 2/3 in one `defect` folder. ELPV's
experts gave each cell a defect probability of 0, 1/3, 2/3 or 1; this writes a copy of that folder
where calibration/ and test/ hold `defect_certain` (probability 1) and `defect_likely` (2/3) instead,
so `lineguard-train run`'s report ("Defects by type") and metrics.json show how each kind escapes.
The split is unchanged (same images in the same splits); train/ and the good folders are linked.

    .venv/bin/python bench/elpv_by_confidence.py /work/data/elpv_mono /work/data/elpv_mono_by_confidence
    .venv/bin/lineguard-train run /work/data/elpv_mono_by_confidence --out OUT --threshold fpr:0.05

Labels: `labels.csv` of PyPI `elpv-dataset` (found when that package is installed; else --labels PATH).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

TYPES = {1.0: "defect_certain", 2 / 3: "defect_likely"}


def probabilities(labels: Path) -> dict[str, float]:
    """image file name -> the experts' defect probability, from ELPV's labels.csv (path, probability, type)."""
    out = {}
    for line in labels.read_text().splitlines():
        if line.strip():
            path, probability, _ = line.split()
            out[Path(path).name] = float(probability)
    return out


def default_labels() -> Path | None:
    try:
        import elpv_dataset  # type: ignore[import-not-found]
    except ImportError:
        return None
    return Path(elpv_dataset.__file__).parent / "data" / "labels.csv"


def relabel(data: Path, out: Path, probability: dict[str, float]) -> dict[str, int]:
    """Write out/ from data/ with each split's defect/ folder split by confidence; returns folder -> images."""
    counts: dict[str, int] = {}
    for split in sorted(p for p in data.iterdir() if p.is_dir()):
        for folder in sorted(p for p in split.iterdir() if p.is_dir()):
            if folder.name != "defect":
                target = out / split.name / folder.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    target.symlink_to(folder.resolve(), target_is_directory=True)
                counts[f"{split.name}/{folder.name}"] = sum(1 for _ in folder.iterdir())
                continue
            for image in sorted(folder.iterdir()):
                p = probability.get(image.name)
                kind = next((name for level, name in TYPES.items() if p is not None and abs(p - level) < 1e-6), None)
                if kind is None:
                    sys.exit(f"{image}: ELPV gives it probability {p}; expected 2/3 or 1 for a defect")
                target = out / split.name / kind / image.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(image, target)
                counts[f"{split.name}/{kind}"] = counts.get(f"{split.name}/{kind}", 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="the folder elpv_mono.py wrote")
    parser.add_argument("out", type=Path)
    parser.add_argument("--labels", type=Path, default=None, help="ELPV's labels.csv (default: elpv-dataset's)")
    args = parser.parse_args()
    labels = args.labels or default_labels()
    if labels is None or not labels.is_file():
        sys.exit("ELPV's labels.csv not found: pip install elpv-dataset, or pass --labels PATH")
    if args.out.exists():
        sys.exit(f"{args.out} exists; give a new folder")
    print(relabel(args.data, args.out, probabilities(labels)))


if __name__ == "__main__":
    main()
