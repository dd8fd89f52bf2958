"""Train several model kinds on one dataset and put their numbers side by side: comparison.json and .html.

Each model runs the whole pipeline into OUT/<model>/ (the same steps as `lineguard-train run`),
so every model keeps its own report and bundle; OUT/comparison.html links to them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from . import pipeline
from .errors import TrainerError
from .export import cpu_session, run_onnx
from .models.base import ModelKind
from .report import DPI, THRESHOLD_COLOUR, format_value, operating_point, styled_axes, template_environment
from .scoring import SplitScores, load_split_scores

log = logging.getLogger(__name__)

TIMED_RUNS = 20  # batch-1 inferences whose median is the CPU latency
AUROC_MARGIN = 0.01  # models this close to the best test AUROC count as equally accurate for the pick
COLOURS = ("#6a51a3", "#2c7fb8", "#e6550d", "#31a354", "#d6616b", "#636363")
ASSETS_DIR = "comparison-assets"

# Variants compare can add as rows beside the model kinds: name -> (model kind, settings over the shared options).
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "patchcore-regions": ("patchcore", {"regions": 2}),  # position-aware bank, for fixtured parts
}

# (field, column label, format, which way is better) of the table; format as report.format_value, plus "ms", "bytes", "yes".
COLUMNS = (
    ("image_auroc", "Image AUROC", "ratio", max),
    ("average_precision", "Average precision", "ratio", max),
    ("f1", "F1 at threshold", "ratio", max),
    ("pixel_auroc", "Pixel AUROC", "ratio", max),
    ("aupro", "AUPRO", "ratio", max),
    ("false_reject_rate", "False-reject rate", "pct", min),
    ("recall", "Recall (defects caught)", "pct", max),
    ("train_s", "Train time (s)", "num", min),
    ("cpu_ms_per_image", "CPU ms / image", "ms", min),
    ("bundle_bytes", "Bundle size", "bytes", min),
    ("variable_size", "Any input size", "yes", None),
)


@dataclass(frozen=True, slots=True)
class ModelRow:
    """One model's test-split numbers at its threshold; ratios in [0, 1], None where the split cannot define them."""

    model: str  # the row's name: a model kind, or a variant from VARIANTS
    image_auroc: float | None
    average_precision: float | None
    f1: float | None
    pixel_auroc: float | None
    aupro: float | None
    false_reject_rate: float | None
    recall: float | None
    threshold: float
    train_s: float
    cpu_ms_per_image: float  # ONNX Runtime CPU, batch 1, median of TIMED_RUNS
    bundle_bytes: int
    variable_size: bool
    report: str  # the model's report/index.html, relative to OUT
    recall_by_defect_type: dict[str, float] = field(default_factory=dict)  # test recall per defect kind


@dataclass(frozen=True, slots=True)
class ComparisonResult:
    """What compare_models wrote: one row per model, the computed pick, and the two files."""

    rows: tuple[ModelRow, ...]
    pick: str
    json_path: Path
    html_path: Path


def compare_models(
    data: pipeline.DataOptions,
    out: Path,
    configs: Mapping[str, pipeline.ModelConfig],
    *,
    threshold: str,
    sign_key: Path | None,
    progress: bool,
) -> ComparisonResult:
    """Run fit → calibrate → evaluate → export → bundle → report per config into OUT/<name>/, then compare them.

    configs: row name (a model kind, or a variant such as "patchcore-regions") -> its config.
    """
    if not configs:
        msg = "compare needs at least one model; list them with --models"
        raise TrainerError(msg)
    rows = []
    for index, (name, config) in enumerate(configs.items(), 1):
        log.info("compare: %s (%d of %d)", name, index, len(configs))
        work = pipeline.Workdir(out / name)
        pipeline.run_all(
            data, work, config, threshold=threshold, bundle_options=pipeline.BundleOptions(sign_key), progress=progress
        )
        rows.append(measure(work, name, pipeline.kind_of(config), out))
    result = ComparisonResult(tuple(rows), pick_line(rows), out / "comparison.json", out / "comparison.html")
    document = {"dataset": data.describe(), "threshold_method": threshold, "cpu": cpu_facts(), "pick": result.pick}
    models = [asdict(row) for row in rows]
    result.json_path.write_text(
        json.dumps({**document, "models": models}, indent=2, ensure_ascii=False) + "\n", "utf-8"
    )
    _write_html(result, out)
    log.info("wrote %s and %s", result.json_path, result.html_path)
    return result


def measure(work: pipeline.Workdir, name: str, kind: ModelKind, out: Path) -> ModelRow:
    """One model's row, called name, from the files its pipeline run wrote under work."""
    test = json.loads(work.metrics_file.read_text())["test"]
    training = json.loads(work.training_file.read_text())
    calibration = load_split_scores(work.scores_file("calibration"))
    return ModelRow(
        model=name,
        image_auroc=test["image_auroc"],
        average_precision=test["average_precision"],
        f1=test["f1"],
        pixel_auroc=test.get("pixel_auroc"),
        aupro=test.get("aupro"),
        false_reject_rate=test["fpr"],
        recall=test["recall"],
        threshold=float(test["threshold"]),
        train_s=float(training["train_seconds"]),
        cpu_ms_per_image=cpu_ms_per_image(work.onnx_file, calibration.images),
        bundle_bytes=sum(path.stat().st_size for path in work.bundle_dir.rglob("*") if path.is_file()),
        variable_size=kind.variable_size,
        report=(work.report_dir / "index.html").relative_to(out).as_posix(),
        recall_by_defect_type={name: entry["recall"] for name, entry in test.get("by_defect_type", {}).items()},
    )


def cpu_ms_per_image(onnx_path: Path, images: np.ndarray, *, runs: int = TIMED_RUNS) -> float:
    """Median ONNX Runtime CPU time of one image at batch 1, in ms, after one warm-up run.

    images: (N, H, W, C) uint8, used in turn; the session keeps ONNX Runtime's default thread count.
    """
    if len(images) == 0 or runs < 1:
        msg = f"timing needs images and runs >= 1, got {len(images)} images and {runs} runs"
        raise TrainerError(msg)
    session = cpu_session(onnx_path)
    run_onnx(session, images[:1])  # the first run allocates and plans
    times_s = []
    for run in range(runs):
        image = images[run % len(images)][np.newaxis]
        started = time.perf_counter()
        run_onnx(session, image, batch_size=1)
        times_s.append(time.perf_counter() - started)
    return float(np.median(times_s)) * 1000.0


def pick_line(rows: Sequence[ModelRow]) -> str:
    """'Pick X: why', then the best test AUROC, the fastest and the smallest bundle, all from the numbers."""
    fastest = min(rows, key=lambda r: r.cpu_ms_per_image)
    smallest = min(rows, key=lambda r: r.bundle_bytes)
    facts = [
        f"fastest: {fastest.model} ({fastest.cpu_ms_per_image:.1f} ms/image)",
        f"smallest bundle: {smallest.model} ({_size(smallest.bundle_bytes)})",
    ]
    aurocs = {r.model: r.image_auroc for r in rows if r.image_auroc is not None}
    if not aurocs:
        return " · ".join(
            [f"Pick {fastest.model}: no test AUROC (the test split lacks a class), so the fastest", *facts]
        )
    best = max(aurocs.values())
    near = [r for r in rows if r.model in aurocs and aurocs[r.model] >= best - AUROC_MARGIN]
    choice = min(near, key=lambda r: r.cpu_ms_per_image)
    why = "best test AUROC" if len(near) == 1 else f"fastest of the models within {AUROC_MARGIN} of the best test AUROC"
    leaders = " = ".join(model for model, auroc in aurocs.items() if auroc == best)
    return " · ".join([f"Pick {choice.model}: {why}", f"best test AUROC: {leaders} ({best:.3f})", *facts])


def cpu_facts() -> dict[str, object]:
    """How cpu_ms_per_image was measured; export.cpu_session leaves the thread count to ONNX Runtime."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "threads": "onnxruntime default",
        "batch_size": 1,
        "timed_runs": TIMED_RUNS,
    }


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 1_000_000 else f"{n_bytes / 1e3:.1f} kB"


def _cell(value: object, kind: str) -> str:
    if kind == "bytes" and isinstance(value, int):
        return _size(value)
    if kind == "yes":
        return "yes" if value else "no"
    if kind == "ms" and isinstance(value, float):
        return f"{value:.2f}"
    return format_value(value, kind)


def _table(rows: Sequence[ModelRow]) -> list[list[tuple[str, bool]]]:
    """Per row, (text, is best in its column) per COLUMNS entry; nothing is best when a column has one value."""
    cells: list[list[tuple[str, bool]]] = [[] for _ in rows]
    for name, _, kind, better in COLUMNS:
        _add_column(cells, [getattr(row, name) for row in rows], kind, better)
    return cells


def _add_column(
    cells: list[list[tuple[str, bool]]], values: list[Any], kind: str, better: Callable[[list[Any]], Any] | None
) -> None:
    """Append one column to every row's cells: (text, is best); nothing is best when the column has one value."""
    present = [v for v in values if v is not None]
    best = better(present) if better and len(set(present)) > 1 else None
    for row_cells, value in zip(cells, values, strict=True):
        row_cells.append((_cell(value, kind), best is not None and value == best))


def _type_table(rows: Sequence[ModelRow]) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """(defect kinds, per row (recall text, is best for that kind) per kind); no kinds when there are fewer than 2."""
    kinds = sorted({kind for row in rows for kind in row.recall_by_defect_type})
    if len(kinds) < 2:
        return [], []
    cells: list[list[tuple[str, bool]]] = [[] for _ in rows]
    for kind in kinds:
        _add_column(cells, [row.recall_by_defect_type.get(kind) for row in rows], "pct", max)
    return kinds, cells


def _overlay_chart(kind: str, rows: Sequence[ModelRow], splits: dict[str, SplitScores], assets: Path) -> str | None:
    """ROC ('roc') or precision-recall ('pr') curves of every model's test split in one chart; its src, or None."""
    if not any(split.has_both_classes for split in splits.values()):
        return None
    fig, ax = styled_axes("ROC, test split" if kind == "roc" else "Precision-recall, test split")
    for index, row in enumerate(rows):
        split = splits[row.model]
        if not split.has_both_classes:
            continue
        fpr, recall, precision = operating_point(split, row.threshold)
        if kind == "roc":
            x, y, _ = roc_curve(split.labels, split.scores)
            label, point = f"{row.model} AUROC {roc_auc_score(split.labels, split.scores):.3f}", (fpr, recall)
        else:
            y, x, _ = precision_recall_curve(split.labels, split.scores)
            label, point = (
                f"{row.model} AP {average_precision_score(split.labels, split.scores):.3f}",
                (recall, precision),
            )
        # Earlier curves are drawn wider, so a later curve lying on top of one leaves it visible at the edges.
        width = 1.5 + 1.8 * (len(rows) - 1 - index)
        style = "default" if kind == "roc" else "steps-post"
        ax.plot(x, y, color=_colour(index), lw=width, label=label, drawstyle=style, solid_capstyle="butt")
        ax.plot(*point, "o", ms=8, mfc="white", mec=_colour(index), mew=2)
    ax.plot([], [], "o", ms=8, mfc="white", mec=THRESHOLD_COLOUR, mew=2, label="operating point at threshold")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls=":")
        ax.set(xlabel="false-reject rate (good parts rejected)", ylabel="recall (defects caught)")
    else:
        ax.set(xlabel="recall (defects caught)", ylabel="precision (rejects that are defects)")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.05))
    ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
    assets.mkdir(parents=True, exist_ok=True)
    fig.savefig(assets / f"{kind}.png", dpi=DPI)
    return f"{ASSETS_DIR}/{kind}.png"


def _colour(index: int) -> str:
    return COLOURS[index % len(COLOURS)]


def _write_html(result: ComparisonResult, out: Path) -> None:
    works = {row.model: pipeline.Workdir(out / row.model) for row in result.rows}
    splits = {model: load_split_scores(work.scores_file("test")) for model, work in works.items()}
    test = next(iter(splits.values()))
    training = json.loads(works[result.rows[0].model].training_file.read_text())
    kinds, kind_cells = _type_table(result.rows)
    template = template_environment().get_template("comparison.html.j2")
    html = template.render(
        title=f"{training['dataset']['name']} — model comparison",
        pick=result.pick,
        columns=[label for _, label, _, _ in COLUMNS],
        rows=[
            (row, _colour(index), cells)
            for index, (row, cells) in enumerate(zip(result.rows, _table(result.rows), strict=True))
        ],
        charts=[_overlay_chart(kind, result.rows, splits, out / ASSETS_DIR) for kind in ("roc", "pr")],
        defect_kinds=kinds,
        kind_rows=[
            (row, _colour(index), cells) for index, (row, cells) in enumerate(zip(result.rows, kind_cells, strict=True))
        ],
        n_good=int(np.sum(test.labels == 0)),
        n_defect=int(np.sum(test.labels == 1)),
        cpu=cpu_facts(),
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    result.html_path.write_text(html, encoding="utf-8")
