"""Two bundles on the same labelled line images: is the new one better, and on which images did it change its mind?

`lineguard-train compare-bundles OLD NEW --data DATA [DATA ...] --out DIR` scores every labelled image of DATA
(an export of line samples, or any dataset the trainer reads) with both bundles through ONNX Runtime, each at its
own threshold, exactly as an agent would. It writes DIR/compare.json and DIR/compare.html: false rejects and
escapes of each bundle with exact (Clopper-Pearson) 95 % intervals, the same per split and, for an export, per
reason the agent kept the sample (reject, close call, random accept), and every image whose verdict changed. A
new bundle whose escapes rise is flagged in red: a retrain on line samples must not buy fewer false rejects with
missed defects. Images in DATA's train split were seen by a bundle trained on DATA: the split rows say so.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from lineguard.agent.bundle import Manifest, read_checked_files, verify_bundle
from lineguard.agent.samples.export import EXPORT_INDEX, ExportIndex
from lineguard.agent.signing import load_trusted_keys

from .calibrate import RateEstimate
from .data import SPLITS, Sample, discover_dataset, load_images, read_image
from .errors import TrainerError
from .export import cpu_session, run_onnx
from .report import template_environment

log = logging.getLogger(__name__)

CONFIDENCE = 0.95
CLOSE_CALL_MARGIN = 0.2  # the agent's default samples.close_call_margin
ASSETS_DIR = "compare-assets"
THUMB_PX = 160
MAX_TILES = 120  # changed images shown on the page; compare.json lists them all


@dataclass(frozen=True, slots=True)
class ImageResult:
    """One labelled image scored by both bundles. label: 0 ok, 1 nok; kind: why the agent kept it ("" if unknown)."""

    file: str
    split: str
    label: int
    defect_type: str
    kind: str
    old_score: float
    new_score: float
    old_reject: bool
    new_reject: bool
    old_close: bool  # accepted, but within the close-call margin below the old bundle's threshold
    new_close: bool

    @property
    def change(self) -> str:
        """ "" when both bundles agree; else what the new bundle's verdict means for this image."""
        if self.old_reject == self.new_reject:
            return ""
        if self.label == 0:
            return "false reject fixed" if self.old_reject else "new false reject"
        return "escape fixed" if self.new_reject else "new escape"


@dataclass(frozen=True, slots=True)
class Errors:
    """One bundle on a set of images: false rejects among goods and escapes among defects (None: no such images).

    close_calls: goods it accepts within the close-call margin of its threshold, tomorrow's false rejects.
    """

    false_rejects: RateEstimate | None
    escapes: RateEstimate | None
    close_calls: int

    @classmethod
    def of(cls, results: Sequence[ImageResult], *, new: bool) -> Errors:
        goods = [r for r in results if r.label == 0]
        defects = [r for r in results if r.label == 1]
        rejected = (lambda r: r.new_reject) if new else (lambda r: r.old_reject)
        close = (lambda r: r.new_close) if new else (lambda r: r.old_close)
        return cls(
            _rate(sum(map(rejected, goods)), len(goods)),
            _rate(sum(not rejected(r) for r in defects), len(defects)),
            sum(map(close, goods)),
        )


@dataclass(frozen=True, slots=True)
class Group:
    """A subset of the images (all, a split, a sample kind) and both bundles' errors on it."""

    name: str
    n_good: int
    n_defect: int
    old: Errors
    new: Errors

    @property
    def escapes_rise(self) -> bool:
        return _count(self.new.escapes) > _count(self.old.escapes)


@dataclass(frozen=True, slots=True)
class BundleFacts:
    label: str
    threshold: float
    threshold_method: str
    path: str


@dataclass(frozen=True, slots=True)
class BundleComparison:
    """What compare_bundles found and wrote."""

    old: BundleFacts
    new: BundleFacts
    groups: tuple[Group, ...]  # groups[0] is every image
    images: tuple[ImageResult, ...]
    signatures_checked: bool
    close_call_margin: float
    json_path: Path
    html_path: Path

    @property
    def overall(self) -> Group:
        return self.groups[0]

    @property
    def changed(self) -> tuple[ImageResult, ...]:
        return tuple(image for image in self.images if image.change)

    def headline(self) -> str:
        """One line: the verdict of the comparison, led by what a line engineer must not miss."""
        group, old, new = self.overall, self.overall.old, self.overall.new
        fr = f"false rejects {_count(old.false_rejects)} -> {_count(new.false_rejects)} of {group.n_good} good"
        esc = f"escapes {_count(old.escapes)} -> {_count(new.escapes)} of {group.n_defect} defects"
        if group.escapes_rise:
            return f"ESCAPES RISE with {self.new.label}: {esc}; {fr}. Do not push it without a look at the new escapes."
        return f"{self.new.label} vs {self.old.label}: {fr}; {esc}."


def compare_bundles(
    old_dir: Path,
    new_dir: Path,
    data: Sequence[Path],
    out: Path,
    *,
    trusted_keys: Sequence[Path] = (),
    close_call_margin: float = CLOSE_CALL_MARGIN,
) -> BundleComparison:
    """Score data with both bundles, write out/compare.json and out/compare.html; see the module docstring.

    close_call_margin: as the agent's samples.close_call_margin, a share of the way from a bundle's median good
    calibration score up to its threshold.
    """
    if not 0.0 <= close_call_margin <= 1.0:
        msg = f"the close-call margin must be in [0, 1], got {close_call_margin}"
        raise TrainerError(msg)
    keys = load_trusted_keys(trusted_keys)
    manifests = [verify_bundle(path, keys) if keys else read_checked_files(path) for path in (old_dir, new_dir)]
    samples, splits, kinds = _labelled_images(data)
    old_scores, new_scores = (
        _scores(path, manifest, samples) for path, manifest in zip((old_dir, new_dir), manifests, strict=True)
    )
    old_t, new_t = (manifest.threshold.value for manifest in manifests)
    old_floor, new_floor = (_close_call_floor(manifest, close_call_margin) for manifest in manifests)
    images = tuple(
        ImageResult(
            file=str(sample.path),
            split=split,
            label=sample.label,
            defect_type="" if sample.label == 0 else sample.defect_type,
            kind=kinds.get(sample.path.resolve(), ""),
            old_score=float(old),
            new_score=float(new),
            old_reject=bool(old >= old_t),
            new_reject=bool(new >= new_t),
            old_close=bool(old_floor <= old < old_t),
            new_close=bool(new_floor <= new < new_t),
        )
        for sample, split, old, new in zip(samples, splits, old_scores, new_scores, strict=True)
    )
    result = BundleComparison(
        old=_facts(old_dir, manifests[0]),
        new=_facts(new_dir, manifests[1]),
        groups=_groups(images),
        images=images,
        signatures_checked=bool(keys),
        close_call_margin=close_call_margin,
        json_path=out / "compare.json",
        html_path=out / "compare.html",
    )
    out.mkdir(parents=True, exist_ok=True)
    result.json_path.write_text(json.dumps(_document(result), indent=1) + "\n")
    _write_html(result, out)
    log.info("wrote %s and %s", result.json_path, result.html_path)
    return result


def _labelled_images(data: Sequence[Path]) -> tuple[list[Sample], list[str], dict[Path, str]]:
    """Every image of every dataset with its split; and, from an export's export.json, why the agent kept each."""
    samples: list[Sample] = []
    splits: list[str] = []
    kinds: dict[Path, str] = {}
    for source, path in enumerate(data):
        dataset = discover_dataset(path, partial=True)
        for split in SPLITS:
            for sample in dataset.split(split):
                samples.append(Sample(sample.path, sample.label, sample.defect_type, None, source))
                splits.append(split)
        index_file = (path if path.is_dir() else path.parent) / EXPORT_INDEX
        if index_file.is_file():
            index = ExportIndex.model_validate_json(index_file.read_text())
            kinds |= {(index_file.parent / image.file).resolve(): image.kind for image in index.images}
    if not samples:
        msg = f"no labelled images in {', '.join(map(str, data))}"
        raise TrainerError(msg)
    return samples, splits, kinds


def _scores(bundle_dir: Path, manifest: Manifest, samples: Sequence[Sample]) -> np.ndarray:
    """(N,) float32 scores of the bundle's ONNX graph on the images, prepared as the agent prepares frames."""
    spec = manifest.input
    images = load_images(tuple(samples), height=spec.height, width=spec.width, channels=spec.channels)
    scores, _ = run_onnx(cpu_session(bundle_dir / manifest.model.onnx_file), images)
    return np.asarray(scores, np.float32)


def _close_call_floor(manifest: Manifest, margin: float) -> float:
    """The lowest score the agent would keep as a close call (agent/samples/policy.py), for this bundle."""
    return manifest.threshold.value - margin * manifest.score_normalisation.scale / 2.0


def _facts(path: Path, manifest: Manifest) -> BundleFacts:
    label = f"{manifest.model_id}@{manifest.model_version}"
    return BundleFacts(label, manifest.threshold.value, manifest.threshold.method, str(path))


def _groups(images: Sequence[ImageResult]) -> tuple[Group, ...]:
    subsets: list[tuple[str, list[ImageResult]]] = [("all images", list(images))]
    subsets += [(f"split {split}", [i for i in images if i.split == split]) for split in SPLITS]
    kinds = sorted({image.kind for image in images if image.kind})
    subsets += [(f"kept as {kind}", [i for i in images if i.kind == kind]) for kind in kinds]
    return tuple(
        Group(
            name,
            sum(i.label == 0 for i in subset),
            sum(i.label == 1 for i in subset),
            Errors.of(subset, new=False),
            Errors.of(subset, new=True),
        )
        for name, subset in subsets
        if subset
    )


def _rate(count: int, total: int) -> RateEstimate | None:
    return RateEstimate.from_counts(count, total, confidence=CONFIDENCE) if total else None


def _count(rate: RateEstimate | None) -> int:
    return 0 if rate is None else rate.count


def _document(result: BundleComparison) -> dict[str, object]:
    def group(each: Group) -> dict[str, object]:
        return {**asdict(each), "escapes_rise": each.escapes_rise}

    return {
        "old": asdict(result.old),
        "new": asdict(result.new),
        "confidence": CONFIDENCE,
        "signatures_checked": result.signatures_checked,
        "close_call_margin": result.close_call_margin,
        "escapes_rise": result.overall.escapes_rise,
        "headline": result.headline(),
        "groups": [group(each) for each in result.groups],
        "changed": [{**asdict(image), "change": image.change} for image in result.changed],
        "images": [asdict(image) for image in result.images],
    }


def _thumbnail(image: ImageResult, assets: Path, index: int) -> str:
    """A small PNG of the image for the gallery; its src relative to the page."""
    picture = read_image(Path(image.file))
    height, width = picture.shape[:2]
    factor = THUMB_PX / max(height, width)
    small = cv2.resize(
        picture, (max(1, round(width * factor)), max(1, round(height * factor))), interpolation=cv2.INTER_AREA
    )
    if small.ndim == 3:
        small = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
    assets.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(assets / f"{index:04d}.png"), small)
    return f"{ASSETS_DIR}/{index:04d}.png"


def _rate_text(rate: RateEstimate | None) -> str:
    if rate is None:
        return "—"
    return f"{rate.count}/{rate.total} = {100 * rate.rate:.1f} % [{100 * rate.low:.1f}, {100 * rate.high:.1f}]"


def _write_html(result: BundleComparison, out: Path) -> None:
    changed = sorted(result.changed, key=lambda image: (image.change != "new escape", image.change, image.file))
    tiles = [(image, _thumbnail(image, out / ASSETS_DIR, index)) for index, image in enumerate(changed[:MAX_TILES])]
    html = (
        template_environment()
        .get_template("compare_bundles.html.j2")
        .render(
            result=result,
            headline=result.headline(),
            rate=_rate_text,
            tiles=tiles,
            n_changed=len(changed),
            generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        )
    )
    result.html_path.write_text(html, encoding="utf-8")
