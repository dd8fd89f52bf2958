"""The HTML report: headline numbers, ROC / PR / score charts, a metrics table and an error gallery."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import jinja2
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from .scoring import SplitScores

log = logging.getLogger(__name__)

GOOD_COLOUR = "#2c7fb8"
DEFECT_COLOUR = "#e6550d"
THRESHOLD_COLOUR = "#222222"
CURVE_COLOUR = "#6a51a3"
OUTLINE_BGR = (255, 0, 255)  # magenta: a colour the turbo map never uses, so the outline stays visible
HEAT_ALPHA = (0.25, 0.7)  # heatmap opacity at the cold and the hot end of the scale
TILE_HEIGHT_PX = 220
DPI = 150
DASH = "—"

# (key, label, format) of each metrics-table row; pixel_auroc and aupro appear only when some split has them.
_METRIC_ROWS = (
    ("image_auroc", "Image AUROC", "ratio"),
    ("average_precision", "Average precision", "ratio"),
    ("pixel_auroc", "Pixel AUROC", "ratio"),
    ("aupro", "AUPRO", "ratio"),
    ("f1", "F1 at threshold", "ratio"),
    ("precision", "Precision (rejects that are defects)", "pct"),
    ("recall", "Recall (defects caught)", "pct"),
    ("accuracy", "Accuracy", "pct"),
    ("fpr", "False-reject rate (FPR)", "pct"),
    ("threshold", "Threshold", "num"),
    ("n_good", "Good images", "num"),
    ("n_defect", "Defect images", "num"),
)
_OPTIONAL_ROWS = ("pixel_auroc", "aupro")


@dataclass(frozen=True, slots=True)
class ReportInputs:
    """Everything the report shows; calibration is Calibration.to_dict(), metrics is keyed by split name."""

    title: str
    model: dict[str, object]
    calibration: dict[str, object]
    metrics: dict[str, dict[str, object]]
    splits: dict[str, SplitScores]
    notes: tuple[str, ...] = ()
    advice: tuple[str, ...] = ()  # a heading line, then options to try (advice.advice), or nothing


@dataclass(frozen=True, slots=True)
class _Context:
    """What every chart and tile of one report shares."""

    assets: Path
    threshold: float
    bins: np.ndarray  # score histogram edges shared by every split
    map_range: tuple[float, float]  # anomaly-map values drawn as the coldest and hottest colour
    gallery_size: int


@dataclass(frozen=True, slots=True)
class _Card:
    label: str
    value: str
    detail: str
    tone: str = ""


@dataclass(frozen=True, slots=True)
class _Chart:
    src: str | None  # relative to index.html; None when skipped
    note: str = ""


@dataclass(frozen=True, slots=True)
class _Tile:
    src: str
    name: str
    path: str
    defect_type: str
    score: str
    rejected: bool
    correct: bool  # rejected defect or accepted good part


@dataclass(frozen=True, slots=True)
class _Group:
    kind: str  # "escape" (defects accepted) or "reject" (good parts rejected)
    n_errors: int
    n_class: int  # images of the class the group draws from (defects for escapes, goods for rejects)
    tiles: tuple[_Tile, ...]  # the worst errors, or the closest correct calls when n_errors is 0


@dataclass(frozen=True, slots=True)
class _SplitView:
    name: str
    summary: str
    charts: tuple[_Chart, ...]
    groups: tuple[_Group, ...]


def render_report(report_dir: Path, inputs: ReportInputs, *, gallery_size: int = 6) -> Path:
    """Write report_dir/index.html and its images under report_dir/assets/; return the index path."""
    threshold = _number(inputs.calibration.get("threshold"))
    if threshold is None:
        msg = f"calibration threshold is {inputs.calibration.get('threshold')!r}; calibrate before the report"
        raise ValueError(msg)
    if gallery_size < 0:
        msg = f"gallery_size is {gallery_size}; use 0 or more tiles per gallery"
        raise ValueError(msg)
    splits = inputs.splits.values()
    ctx = _Context(
        assets=report_dir / "assets",
        threshold=threshold,
        bins=np.histogram_bin_edges(np.concatenate([[threshold], *(s.scores for s in splits)]), bins=40),
        map_range=_map_range(splits, threshold),
        gallery_size=gallery_size,
    )
    ctx.assets.mkdir(parents=True, exist_ok=True)
    _write_image(ctx.assets / "colourbar.png", _colourbar())
    test_first = sorted(inputs.splits, key=lambda name: name != "test")
    views = [_split_view(name, inputs.splits[name], ctx) for name in test_first]
    index = report_dir / "index.html"
    index.write_text(_page(inputs, views, ctx), encoding="utf-8")
    log.info("wrote report %s (%d splits)", index, len(views))
    return index


def _split_view(name: str, split: SplitScores, ctx: _Context) -> _SplitView:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", name)
    n_defect = int(np.sum(split.labels == 1))
    charts = (_roc_chart(stem, split, ctx), _pr_chart(stem, split, ctx), _histogram_chart(stem, split, ctx))
    summary = f"{len(split.labels) - n_defect} good, {n_defect} defect images"
    return _SplitView(name, summary, charts, _gallery(stem, split, ctx))


def _map_range(splits: Collection[SplitScores], threshold: float) -> tuple[float, float]:
    """Map values drawn coldest and hottest in every tile: good maps' 1st percentile, all maps' 99.9th."""
    maps = [_sample(s.maps) for s in splits if s.maps.size]
    if not maps:
        return 0.0, 1.0
    values = np.concatenate(maps)
    goods = np.concatenate([_sample(s.maps[s.labels == 0]) for s in splits if s.maps.size])
    low = float(np.percentile(goods if goods.size else values, 1))
    high = float(np.percentile(values, 99.9))
    if threshold > low:
        # Scores on the map's scale (e.g. a map maximum): put the threshold between mid-scale and the top, so
        # colour reads as "how close to a reject": a long defect tail does not wash the scale out, and
        # noise on a clean split does not glow red.
        high = max(min(high, low + 2 * (threshold - low)), threshold)
    return low, high if high > low else low + 1.0


def _sample(maps: np.ndarray, limit: int = 2_000_000) -> np.ndarray:
    """A strided subsample of the map values, (<= limit,) float: percentiles without copying every pixel."""
    flat = maps.reshape(-1)
    return flat[:: max(1, flat.size // limit)]


def operating_point(split: SplitScores, threshold: float) -> tuple[float, float, float]:
    """(false-positive rate, recall, precision) of rejecting at score >= threshold."""
    rejected = split.scores >= threshold
    tp, fp = int(np.sum(rejected & (split.labels == 1))), int(np.sum(rejected & (split.labels == 0)))
    fpr = fp / max(1, int(np.sum(split.labels == 0)))
    recall = tp / max(1, int(np.sum(split.labels == 1)))
    return fpr, recall, tp / (tp + fp) if tp + fp else 1.0


def styled_axes(title: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(4.6, 3.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(alpha=0.25)
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _mark(ax: Axes, x: float, y: float, label: str) -> None:
    """The operating point at the threshold: a hollow circle."""
    ax.plot(x, y, "o", ms=8, mfc="white", mec=THRESHOLD_COLOUR, mew=2, label=label)


def _save(fig: Figure, path: Path) -> _Chart:
    fig.savefig(path, dpi=DPI)
    return _Chart(f"assets/{path.name}")


def _one_class_note(chart: str, split: SplitScores) -> str:
    held = "no" if not split.labels.size else "only good" if np.all(split.labels == 0) else "only defect"
    return f"{chart} skipped: this split holds {held} images; it needs good and defect images."


def _roc_chart(stem: str, split: SplitScores, ctx: _Context) -> _Chart:
    if not split.has_both_classes:
        return _Chart(None, _one_class_note("ROC", split))
    fpr, tpr, _ = roc_curve(split.labels, split.scores)
    op_fpr, op_tpr, _ = operating_point(split, ctx.threshold)
    fig, ax = styled_axes("ROC")
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls=":")
    auroc = roc_auc_score(split.labels, split.scores)
    ax.plot(fpr, tpr, color=CURVE_COLOUR, lw=2, label=f"AUROC {auroc:.3f}")
    _mark(ax, op_fpr, op_tpr, f"threshold: FPR {op_fpr:.0%}, recall {op_tpr:.0%}")
    ax.set(xlabel="false-reject rate (good parts rejected)", ylabel="recall (defects caught)")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, ctx.assets / f"{stem}_roc.png")


def _pr_chart(stem: str, split: SplitScores, ctx: _Context) -> _Chart:
    if not split.has_both_classes:
        return _Chart(None, _one_class_note("Precision-recall", split))
    precision, recall, _ = precision_recall_curve(split.labels, split.scores)
    _, op_recall, op_precision = operating_point(split, ctx.threshold)
    ap = average_precision_score(split.labels, split.scores)
    fig, ax = styled_axes("Precision-recall")
    ax.axhline(float(np.mean(split.labels == 1)), color="#bbbbbb", lw=1, ls=":")
    ax.plot(recall, precision, color=CURVE_COLOUR, lw=2, drawstyle="steps-post", label=f"AP {ap:.3f}")
    _mark(ax, op_recall, op_precision, f"threshold: precision {op_precision:.0%}, recall {op_recall:.0%}")
    ax.set(xlabel="recall (defects caught)", ylabel="precision (rejects that are defects)")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.05))
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, ctx.assets / f"{stem}_pr.png")


def _histogram_chart(stem: str, split: SplitScores, ctx: _Context) -> _Chart:
    if not split.scores.size:
        return _Chart(None, "Score histogram skipped: this split holds no images.")
    fig, ax = styled_axes("Anomaly scores")
    for label, noun, colour in ((0, "good", GOOD_COLOUR), (1, "defect", DEFECT_COLOUR)):
        scores = split.scores[split.labels == label]
        if scores.size:
            ax.hist(scores, bins=ctx.bins.tolist(), color=colour, alpha=0.55, label=f"{noun} ({scores.size})")
    ax.axvspan(ctx.threshold, ctx.bins[-1], color=THRESHOLD_COLOUR, alpha=0.05, lw=0)  # the reject side
    ax.axvline(ctx.threshold, color=THRESHOLD_COLOUR, ls="--", lw=1.5, label=f"threshold {ctx.threshold:.4g}")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="anomaly score (reject at or above the threshold)", ylabel="images")
    ax.legend(fontsize=8)
    return _save(fig, ctx.assets / f"{stem}_scores.png")


def _gallery(stem: str, split: SplitScores, ctx: _Context) -> tuple[_Group, ...]:
    """Worst escapes and worst false rejects, or the closest correct calls when a split has none."""
    order = np.argsort(split.scores, kind="stable")
    defects_low_first = order[split.labels[order] == 1]
    goods_high_first = order[split.labels[order] == 0][::-1]
    escapes = defects_low_first[split.scores[defects_low_first] < ctx.threshold]
    rejects = goods_high_first[split.scores[goods_high_first] >= ctx.threshold]
    groups = []
    for kind, errors, ranked in (
        ("escape", escapes, defects_low_first),
        ("reject", rejects, goods_high_first),
    ):
        shown = (errors if errors.size else ranked)[: ctx.gallery_size]
        tiles = tuple(_write_tile(split, int(i), f"{stem}_{kind}_{n:02d}", ctx) for n, i in enumerate(shown, 1))
        groups.append(_Group(kind, int(errors.size), int(ranked.size), tiles))
    return tuple(groups)


def _write_tile(split: SplitScores, index: int, stem: str, ctx: _Context) -> _Tile:
    path = ctx.assets / f"{stem}.jpg"
    _write_image(path, _tile_pixels(split, index, ctx.map_range))
    score = float(split.scores[index])
    score_text, threshold_text = _distinct(score, ctx.threshold)
    relation = "≥" if score >= ctx.threshold else "<"
    return _Tile(
        src=f"assets/{path.name}",
        name=Path(split.paths[index]).name,
        path=split.paths[index],
        defect_type=split.defect_types[index],
        score=f"score {score_text} {relation} {threshold_text}",
        rejected=score >= ctx.threshold,
        correct=(score >= ctx.threshold) == bool(split.labels[index] == 1),
    )


def _tile_pixels(split: SplitScores, index: int, map_range: tuple[float, float]) -> np.ndarray:
    """Image | heatmap overlay, ground-truth outline on both: (TILE_HEIGHT_PX, W, 3) uint8 BGR."""
    image = split.images[index]
    if image.ndim == 2 or image.shape[-1] == 1:
        bgr = cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    else:
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    size = (round(bgr.shape[1] * TILE_HEIGHT_PX / bgr.shape[0]), TILE_HEIGHT_PX)  # cv2 wants (w, h)
    bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)
    amap = cv2.resize(split.maps[index].astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    low, high = map_range
    level = np.clip((amap - low) / (high - low), 0.0, 1.0)
    heat = cv2.applyColorMap(np.round(level * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    # Opacity grows with heat, so a hot spot stands out and a cold area keeps its detail.
    alpha = (HEAT_ALPHA[0] + (HEAT_ALPHA[1] - HEAT_ALPHA[0]) * level)[..., None]
    overlay = np.round(bgr * (1.0 - alpha) + heat * alpha).astype(np.uint8)
    if split.masks is not None:
        mask = cv2.resize(split.masks[index].astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for panel in (bgr, overlay):
            cv2.drawContours(panel, contours, -1, OUTLINE_BGR, 2, cv2.LINE_AA)
    return np.hstack([bgr, np.full((TILE_HEIGHT_PX, 4, 3), 255, np.uint8), overlay])


def _colourbar() -> np.ndarray:
    """The heatmap colour scale, cold to hot: (12, 256, 3) uint8 BGR."""
    return cv2.applyColorMap(np.tile(np.arange(256, dtype=np.uint8), (12, 1)), cv2.COLORMAP_TURBO)


def _write_image(path: Path, pixels: np.ndarray) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if path.suffix == ".jpg" else []
    if not cv2.imwrite(str(path), pixels, params):
        msg = f"could not write {path}; is the report folder writable?"
        raise OSError(msg)


def _distinct(a: float, b: float) -> tuple[str, str]:
    """a and b with enough significant digits (4 to 8) that they read differently when they differ."""
    for digits in range(4, 9):
        if f"{a:.{digits}g}" != f"{b:.{digits}g}":
            break
    return f"{a:.{digits}g}", f"{b:.{digits}g}"


def _number(value: object) -> float | None:
    """value as a finite float, or None when it is missing, not a number, or nan/inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return None
    return float(value) if math.isfinite(value) else None


def format_value(value: object, kind: str = "num") -> str:
    """value for the page, "—" when missing or not finite; kind: "num", "ratio" (0.973) or "pct" (97.3 %)."""
    number = _number(value)
    if number is None:
        if value is None or isinstance(value, (float, np.floating)):
            return DASH
        return ", ".join(format_value(v) for v in value) if isinstance(value, (list, tuple)) else str(value) or DASH
    if kind == "pct":
        return _pct(number)
    if kind == "ratio":
        return f"{number:.3f}"
    return f"{value:,}" if isinstance(value, (int, np.integer)) else f"{number:.4g}"


def _pct(rate: object, *, unit: bool = True) -> str:
    """A 0..1 rate as a percentage, "1.2 %" (or "1.2" without unit); "—" when missing."""
    number = _number(rate)
    if number is None:
        return DASH
    text = f"{number * 100:.{2 if 0 < abs(number) < 0.001 else 1}f}"
    return f"{text}\u00a0%" if unit else text


def _rate_card(label: str, rate: object, confidence: object, noun: str) -> _Card:
    """A calibration rate {"count", "total", "rate", "low", "high"}: value "1.2 %", detail its interval."""
    tone = "good" if noun == "good" else "defect"
    if not isinstance(rate, dict) or _number(rate.get("rate")) is None:
        return _Card(label, DASH, f"no {noun} images in calibration", tone)
    level = _number(confidence)
    level_text = DASH if level is None else f"{level * 100:g}\u00a0%"
    interval = f"({_pct(rate.get('low'), unit=False)}\u2013{_pct(rate.get('high'))}, {level_text})"
    counts = f"{format_value(rate.get('count'))} of {format_value(rate.get('total'))} {noun} parts in calibration"
    return _Card(label, _pct(rate.get("rate")), f"{interval} · {counts}", tone)


def _headline(inputs: ReportInputs) -> tuple[_Card, ...]:
    split = "test" if "test" in inputs.metrics else next(iter(inputs.metrics), "")
    metrics, calibration = inputs.metrics.get(split, {}), inputs.calibration
    return (
        _Card("Image AUROC", format_value(metrics.get("image_auroc"), "ratio"), f"{split or DASH} split"),
        _Card("F1 at threshold", format_value(metrics.get("f1"), "ratio"), f"{split or DASH} split"),
        _rate_card("False rejects", calibration.get("false_reject"), calibration.get("confidence"), "good"),
        _rate_card("Escapes", calibration.get("escape"), calibration.get("confidence"), "defect"),
        _Card(
            "Threshold",
            format_value(calibration.get("threshold")),
            f"method: {format_value(calibration.get('method'))}",
        ),
    )


def _metric_rows(metrics: dict[str, dict[str, object]]) -> list[tuple[str, list[str]]]:
    """(label, one formatted value per split) for each row; keys this module does not know come last."""
    present = {key for values in metrics.values() for key in values}
    rows = [row for row in _METRIC_ROWS if row[0] not in _OPTIONAL_ROWS or row[0] in present]
    known = {row[0] for row in _METRIC_ROWS} | {"confusion", "by_defect_type"}
    rows += [(key, key.replace("_", " ").capitalize(), "num") for key in sorted(present - known)]
    return [(label, [format_value(split.get(key), kind) for split in metrics.values()]) for key, label, kind in rows]


def _defect_type_rows(metrics: dict[str, dict[str, object]]) -> list[tuple[str, list[str]]]:
    """(defect type, one "caught of n · recall · AUROC" cell per split) when the splits hold 2 or more types, else [].

    One type only repeats the split's recall, so the table is left out.
    """
    tables = [split.get("by_defect_type") for split in metrics.values()]
    per_split = [table if isinstance(table, dict) else {} for table in tables]
    types = sorted({name for table in per_split for name in table})
    if len(types) < 2:
        return []

    def cell(entry: object) -> str:
        if not isinstance(entry, dict):
            return DASH
        n, escapes = entry.get("n"), entry.get("escapes")
        caught = n - escapes if isinstance(n, int) and isinstance(escapes, int) else None
        return (
            f"{format_value(caught)} of {format_value(n)} caught · {format_value(entry.get('recall'), 'pct')}"
            f" · AUROC {format_value(entry.get('image_auroc'), 'ratio')}"
        )

    return [(name, [cell(table.get(name)) for table in per_split]) for name in types]


def _confusions(metrics: dict[str, dict[str, object]]) -> list[dict[str, str] | None]:
    """Each split's confusion counts formatted, or None when the split has none."""
    cells = [split.get("confusion") for split in metrics.values()]
    return [
        {k: format_value(c.get(k)) for k in ("tn", "fp", "fn", "tp")} if isinstance(c, dict) else None for c in cells
    ]


def template_environment() -> jinja2.Environment:
    """The jinja2 environment of the trainer's HTML templates (trainer/templates/*.j2)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("lineguard.trainer", "templates"),
        autoescape=True,  # select_autoescape() would not match the ".j2" suffix
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _page(inputs: ReportInputs, views: list[_SplitView], ctx: _Context) -> str:
    template = template_environment().get_template("report.html.j2")
    return template.render(
        title=inputs.title,
        cards=_headline(inputs),
        notes=inputs.notes,
        advice=inputs.advice,
        model=[(str(key), format_value(value)) for key, value in inputs.model.items()],
        columns=list(inputs.metrics),
        metric_rows=_metric_rows(inputs.metrics),
        confusions=_confusions(inputs.metrics),
        defect_type_rows=_defect_type_rows(inputs.metrics),
        splits=views,
        map_range=[format_value(v) for v in ctx.map_range],
        threshold=format_value(ctx.threshold),
        colours={"good": GOOD_COLOUR, "defect": DEFECT_COLOUR, "threshold": THRESHOLD_COLOUR},
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
