"""Labelled samples -> a dataset the trainer reads: an MVTec-style folder or a CSV manifest, with a README.

Which sample goes where (labelled ok to train and calibration, confirmed defects to calibration and test,
unlabelled and `unsure` ones left out) is decided per sample by a hash of its id, so a sample keeps its split
in every later export of the same store: an image that calibrated one retrain is never trained on by the next.
Each split of a class gets at least one image once the class has two. The export's README says where the images
came from (agent, cameras, models, time range, who labelled) and how to train on it; export.json lists every
image with its sample record, so `lineguard-train compare-bundles` can say which close calls changed verdict.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import cv2
from pydantic import BaseModel, ConfigDict

from ..contract import LabelKind, SampleKind
from .files import ROI_FILE, VIEW_FILE, SampleFileError, SampleInfo, read_sample, sample_folders

Layout = Literal["mvtec", "csv"]
EXPORT_INDEX, EXPORT_README, MANIFEST_CSV = "export.json", "README.md", "manifest.csv"
_SPLITS = {"ok": ("train", "calibration"), "nok": ("calibration", "test")}


class ExportError(Exception):
    """Nothing to export, or the export cannot be written; the message says what to do."""


class _Index(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExportedImage(_Index):
    """One image of an export: where it went and the sample it came from."""

    file: str  # relative to the export folder
    split: Literal["train", "calibration", "test"]
    label: LabelKind
    defect_type: str
    sample_id: str
    kind: SampleKind
    agent_id: str
    camera: str
    seq: int
    verdict: str
    score: float | None
    threshold: float
    model: str
    capture_ts: float
    labelled_by: str


class ExportIndex(_Index):
    """export.json: what an export holds."""

    schema_version: Literal[1] = 1
    created_ts: float
    layout: Layout
    image: Literal["view", "roi"]
    images: tuple[ExportedImage, ...]


@dataclass(frozen=True, slots=True)
class Selection:
    """Which stored samples an export takes: cameras (empty = all), capture time range (Unix s, None = open)."""

    cameras: tuple[str, ...] = ()
    since_ts: float | None = None
    until_ts: float | None = None

    def takes(self, info: SampleInfo) -> bool:
        ts = info.meta.decision.capture_ts
        return (
            (not self.cameras or info.camera in self.cameras)
            and (self.since_ts is None or ts >= self.since_ts)
            and (self.until_ts is None or ts < self.until_ts)
        )


@dataclass(frozen=True, slots=True)
class ExportSummary:
    """What export_samples wrote and what it left out (counts by reason)."""

    out: Path
    index: ExportIndex
    left_out: dict[str, int]


def export_samples(
    root: Path, out: Path, *, layout: Layout = "mvtec", image: Literal["view", "roi"] = "view", selection: Selection
) -> ExportSummary:
    """Write the labelled samples under root that `selection` takes into out (a new or empty folder)."""
    if out.exists() and any(out.iterdir()):
        msg = f"{out} is not empty: export into a new folder (exports are kept side by side, one per retrain)"
        raise ExportError(msg)
    chosen, left_out = _choose(root, selection, image)
    if not chosen:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(left_out.items())) or "none stored"
        msg = f"no labelled samples to export from {root} ({reasons}): label some with `lineguard-agent samples label` or from the dashboard"
        raise ExportError(msg)
    _check_one_size(chosen, image)
    assigned = _assign_splits(chosen)
    entries = [_entry(info, split, layout) for info, split in assigned]
    out.mkdir(parents=True, exist_ok=True)
    for (info, _), entry in zip(assigned, entries, strict=True):
        target = out / entry.file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(info.path / (VIEW_FILE if image == "view" else ROI_FILE), target)
    index = ExportIndex(created_ts=time.time(), layout=layout, image=image, images=tuple(entries))
    if layout == "csv":
        (out / MANIFEST_CSV).write_text(_manifest_csv(entries))
    (out / EXPORT_INDEX).write_text(index.model_dump_json(indent=1) + "\n")
    (out / EXPORT_README).write_text(_readme(index, left_out, out))
    return ExportSummary(out, index, left_out)


def _choose(root: Path, selection: Selection, image: str) -> tuple[list[SampleInfo], dict[str, int]]:
    """Labelled ok/nok samples with the wanted image, oldest first; and what was left out, by reason."""
    chosen: list[SampleInfo] = []
    left_out: Counter[str] = Counter()
    for folder in sample_folders(root):
        try:
            info = read_sample(folder)
        except SampleFileError:
            left_out["unreadable"] += 1
            continue
        if not selection.takes(info):
            continue
        if info.label is None:
            left_out["unlabelled"] += 1
        elif info.label.label == "unsure":
            left_out["labelled unsure"] += 1
        elif not (info.meta.view if image == "view" else info.meta.roi):
            left_out[f"without a {image} image (failsafes keep none)"] += 1
        else:
            chosen.append(info)
    chosen.sort(key=lambda info: (info.meta.decision.capture_ts, info.meta.sample_id))
    return chosen, dict(left_out)


def _check_one_size(chosen: Sequence[SampleInfo], image: str) -> None:
    """The trainer takes one image size per dataset: refuse a mix (cameras or models with other input sizes)."""
    sizes: dict[tuple[int, ...], str] = {}
    for info in chosen:
        decoded = cv2.imread(str(info.path / (VIEW_FILE if image == "view" else ROI_FILE)), cv2.IMREAD_UNCHANGED)
        if decoded is None:
            msg = f"{info.path} holds an unreadable {image} image: remove the sample folder and export again"
            raise ExportError(msg)
        sizes.setdefault(decoded.shape, f"{info.camera} ({info.meta.decision.model})")
    if len(sizes) > 1:
        found = "; ".join(f"{shape[1]}x{shape[0]} from {where}" for shape, where in sizes.items())
        msg = f"the samples have different image sizes ({found}): export one camera or model at a time (--camera)"
        raise ExportError(msg)


def _assign_splits(chosen: Sequence[SampleInfo]) -> list[tuple[SampleInfo, str]]:
    """(sample, split) for each: by a hash of the sample id, each split of a class non-empty from two samples on."""
    assigned: list[tuple[SampleInfo, str]] = []
    for label, (first, second) in _SPLITS.items():
        group = [info for info in chosen if info.label is not None and info.label.label == label]
        if not group:
            continue
        ranked = sorted(group, key=lambda info: _unit(info.meta.sample_id))
        firsts = [info for info in ranked if _unit(info.meta.sample_id) < 0.5]
        if len(group) >= 2 and len(firsts) in (0, len(group)):  # every hash on one side: split at the rank instead
            firsts = ranked[: (len(group) + 1) // 2]
        if len(group) == 1:
            firsts = group
        ids = {info.meta.sample_id for info in firsts}
        assigned += [(info, first if info.meta.sample_id in ids else second) for info in group]
    return sorted(assigned, key=lambda pair: (pair[0].meta.decision.capture_ts, pair[0].meta.sample_id))


def _unit(sample_id: str) -> float:
    return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "little") / 2.0**64


def _entry(info: SampleInfo, split: str, layout: Layout) -> ExportedImage:
    assert info.label is not None
    label, verdict = info.label, info.meta.decision
    folder = "good" if label.label == "ok" else label.defect_type or "defect"
    name = f"{info.meta.sample_id}.png"
    return ExportedImage(
        file=f"images/{name}" if layout == "csv" else f"{split}/{folder}/{name}",
        split=split,  # type: ignore[arg-type]
        label=label.label,
        defect_type=label.defect_type,
        sample_id=info.meta.sample_id,
        kind=info.meta.kind,
        agent_id=verdict.agent_id,
        camera=verdict.camera,
        seq=verdict.seq,
        verdict=verdict.verdict,
        score=verdict.score,
        threshold=verdict.threshold,
        model=verdict.model,
        capture_ts=verdict.capture_ts,
        labelled_by=label.by,
    )


def _manifest_csv(entries: Sequence[ExportedImage]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("path", "label", "split"))
    writer.writerows((entry.file, entry.label, entry.split) for entry in entries)
    return buffer.getvalue()


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _readme(index: ExportIndex, left_out: dict[str, int], out: Path) -> str:
    images = index.images
    first, last = min(e.capture_ts for e in images), max(e.capture_ts for e in images)
    models = Counter(e.model for e in images)
    splits = Counter((e.split, e.label if e.label == "ok" else f"nok/{e.defect_type or 'defect'}") for e in images)
    kinds = Counter(e.kind for e in images)
    data = out if index.layout == "mvtec" else out / MANIFEST_CSV
    lines = [
        f"# Line samples exported {_utc(index.created_ts)}",
        "",
        f"- agent(s): {', '.join(sorted({e.agent_id for e in images}))}; camera(s): {', '.join(sorted({e.camera for e in images}))}",
        f"- captured from {_utc(first)} to {_utc(last)}",
        "- source model(s): " + ", ".join(f"{model} ({n} images)" for model, n in models.most_common()),
        "- why each was kept: " + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()),
        f"- labelled by: {', '.join(sorted({e.labelled_by for e in images}))}",
        f"- image: the model's {'view (ROI resized to its input)' if index.image == 'view' else 'ROI at camera resolution'}",
        f"- layout: {'MVTec-style folders' if index.layout == 'mvtec' else 'CSV manifest (manifest.csv)'}",
        "- left out: " + (", ".join(f"{n} {why}" for why, n in sorted(left_out.items())) or "nothing"),
        "",
        "| split | class | images |",
        "| --- | --- | --- |",
        *(f"| {split} | {label} | {n} |" for (split, label), n in sorted(splits.items())),
        "",
        "Retrain on the original data plus this export, then compare old and new on these images:",
        "",
        "```bash",
        f"lineguard-train run ORIGINAL_DATA {data} --out NEW_WORK --sign-key KEY",
        f"lineguard-train compare-bundles OLD_BUNDLE NEW_WORK/bundle --data {data} --out NEW_WORK/compare",
        "```",
        "",
        f"`{EXPORT_INDEX}` lists every image with the sample it came from (score, verdict, model, why it was kept).",
    ]
    return "\n".join(lines) + "\n"
