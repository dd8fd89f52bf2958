"""The HTML report renders from small synthetic splits: assets, headline, gallery order, one-class splits."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from lineguard.trainer.report import ReportInputs, render_report
from lineguard.trainer.scoring import SplitScores

THRESHOLD = 0.5


def make_split(name: str, scores: list[float], labels: list[int], *, channels: int = 1) -> SplitScores:
    """32x32 images; each defect has a square mask and a hot square in its map, goods a flat map."""
    rng = np.random.default_rng(len(scores) * 10 + channels)
    n = len(scores)
    base = rng.integers(60, 120, (n, 32, 32, 1), dtype=np.uint8)
    images = base * np.array([2, 1, 1], np.uint8)[:channels] if channels == 3 else base
    masks = np.zeros((n, 32, 32), bool)
    maps = rng.uniform(0.0, 0.2, (n, 32, 32)).astype(np.float32)
    for i, label in enumerate(labels):
        if label:
            masks[i, 10:20, 12:22] = True
            maps[i, 10:20, 12:22] = scores[i]
    return SplitScores(
        name=name,
        paths=tuple(f"/data/{name}/{'defect' if label else 'good'}/{i:03d}.png" for i, label in enumerate(labels)),
        images=images,
        labels=np.array(labels, np.int64),
        defect_types=tuple("scratch" if label else "good" for label in labels),
        scores=np.array(scores, np.float32),
        maps=maps,
        masks=masks,
    )


def split_metrics(**overrides: object) -> dict[str, object]:
    metrics: dict[str, object] = {
        "image_auroc": 0.98765,
        "average_precision": 0.95,
        "f1": 0.8,
        "precision": 0.8,
        "recall": 0.8,
        "accuracy": 0.8,
        "fpr": 0.2,
        "threshold": THRESHOLD,
        "n_good": 5,
        "n_defect": 5,
        "confusion": {"tn": 4, "fp": 1, "fn": 1, "tp": 4},
    }
    return metrics | overrides


def make_inputs(splits: dict[str, SplitScores], metrics: dict[str, dict[str, object]]) -> ReportInputs:
    rate = {"count": 1, "total": 5, "rate": 0.012, "low": 0.001, "high": 0.043}
    return ReportInputs(
        title="brick — patchcore / efficientnet-lite0",
        model={"model": "patchcore", "bank size": 1024, "train time s": None},
        calibration={
            "method": "f1",
            "threshold": THRESHOLD,
            "confidence": 0.95,
            "false_reject": rate,
            "escape": None,
        },
        metrics=metrics,
        splits=splits,
        notes=("No calibration/ folder: calibration is a seeded stratified 50% of test/.",),
        advice=("Calibration image AUROC is 0.900, below 0.97", "try `--regions 2`"),
    )


# Test split: good 009 scores highest of all (the worst false reject), good 008 is a milder one;
# defect 002 scores lowest (the worst escape), defect 003 is a milder escape.
TEST_SCORES = [0.9, 0.8, 0.1, 0.4, 0.7, 0.2, 0.3, 0.1, 0.6, 0.95]
TEST_LABELS = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
# Calibration split: no errors at all, so the gallery shows the closest correct calls.
CALIBRATION_SCORES = [0.9, 0.8, 0.55, 0.7, 0.6, 0.1, 0.2, 0.3, 0.45, 0.05]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    splits = {
        "calibration": make_split("calibration", CALIBRATION_SCORES, TEST_LABELS),
        "test": make_split("test", TEST_SCORES, TEST_LABELS),
    }
    metrics = {"calibration": split_metrics(aupro=None, pixel_auroc=0.9), "test": split_metrics(f1=None)}
    index = render_report(tmp_path_factory.mktemp("report"), make_inputs(splits, metrics), gallery_size=3)
    return index, index.read_text(encoding="utf-8")


def section(html: str, split: str) -> str:
    start = html.index(f'id="split-{split}"')
    return html[start : html.find("</section>", start)]


def tile_names(group_html: str) -> list[str]:
    return re.findall(r'class="name"[^>]*>\d+\. ([^<]+)<', group_html)


def test_index_references_only_asset_files_that_exist(report: tuple[Path, str]) -> None:
    index, html = report
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources, "the page shows no images"
    for source in sources:
        assert not re.match(r"[a-z]+:", source), f"{source} is not a relative path"
        assert (index.parent / source).is_file(), f"{source} is referenced but missing"
    assert any(source.endswith(".jpg") for source in sources)
    assert any(source.endswith("_roc.png") for source in sources)


def test_headline_shows_the_test_auroc_and_calibrated_false_reject_interval(report: tuple[Path, str]) -> None:
    _, html = report
    header = html[html.index("<header") : html.index("</header>")]
    assert "0.988" in header
    assert "1.2\u00a0%" in header
    assert "(0.1\u20134.3\u00a0%, 95\u00a0%)" in header


def test_missing_values_render_as_a_dash_never_none_or_nan(report: tuple[Path, str]) -> None:
    _, html = report
    assert "—" in html  # test f1, calibration aupro, the missing escape estimate, train time
    assert "None" not in html
    assert not re.search(r"\bnan\b", html, flags=re.IGNORECASE)


def test_the_notes_are_shown(report: tuple[Path, str]) -> None:
    _, html = report
    assert "No calibration/ folder" in html


def test_the_accuracy_advice_is_shown_with_its_options(report: tuple[Path, str]) -> None:
    _, html = report
    assert "Calibration image AUROC is 0.900, below 0.97" in html
    assert "<li>try `--regions 2`</li>" in html


def test_the_top_scoring_good_image_leads_the_false_reject_gallery(report: tuple[Path, str]) -> None:
    _, html = report
    test = section(html, "test")
    rejects = test[test.index("False rejects:") :]
    escapes = test[test.index("False accepts (escapes):") : test.index("False rejects:")]
    assert tile_names(rejects) == ["009.png", "008.png"]
    assert tile_names(escapes) == ["002.png", "003.png"]


def test_a_split_without_errors_shows_its_closest_correct_calls(report: tuple[Path, str]) -> None:
    _, html = report
    calibration = section(html, "calibration")
    assert calibration.count("correct, closest calls") == 2
    escapes, rejects = calibration.split("No false rejects.")
    assert tile_names(escapes) == ["002.png", "004.png", "003.png"]  # lowest-scoring defects first
    assert tile_names(rejects) == ["008.png", "007.png", "006.png"]  # highest-scoring goods first


def test_tiles_outline_the_ground_truth_mask(report: tuple[Path, str]) -> None:
    index, html = report
    source = re.search(r'src="(assets/test_escape_01\.jpg)"', html)
    assert source is not None
    tile = cv2.imread(str(index.parent / source.group(1)))
    magenta = (tile[..., 0] > 200) & (tile[..., 1] < 80) & (tile[..., 2] > 200)
    assert magenta.sum() > 50


def test_a_split_with_only_good_images_renders_and_says_the_roc_is_skipped(tmp_path: Path) -> None:
    splits = {"test": make_split("test", [0.1, 0.2, 0.6, 0.3], [0, 0, 0, 0])}
    metrics = {"test": split_metrics(image_auroc=None, average_precision=None, n_defect=0)}
    index = render_report(tmp_path, make_inputs(splits, metrics))
    html = index.read_text(encoding="utf-8")
    assert "ROC skipped" in html
    assert "only good images" in html
    assert "no defects in this split" in html
    assert (tmp_path / "assets" / "test_scores.png").is_file()
    assert tile_names(html) == ["002.png"]  # the one false reject: 0.6 >= 0.5


def test_rgb_images_keep_their_colour_in_the_gallery(tmp_path: Path) -> None:
    splits = {"test": make_split("test", TEST_SCORES, TEST_LABELS, channels=3)}
    render_report(tmp_path, make_inputs(splits, {"test": split_metrics()}), gallery_size=1)
    tile = cv2.imread(str(tmp_path / "assets" / "test_reject_01.jpg")).astype(int)
    left = tile[:, : tile.shape[1] // 2 - 4]  # the plain image: red twice green in RGB, so R > B in BGR
    assert np.mean(left[..., 2] - left[..., 0]) > 40


def test_a_missing_threshold_is_refused(tmp_path: Path) -> None:
    inputs = make_inputs({"test": make_split("test", TEST_SCORES, TEST_LABELS)}, {"test": split_metrics()})
    broken = ReportInputs(inputs.title, inputs.model, {"threshold": None}, inputs.metrics, inputs.splits)
    with pytest.raises(ValueError, match="calibration threshold is None"):
        render_report(tmp_path, broken)


def test_defects_by_type_show_what_escapes_per_split(tmp_path: Path) -> None:
    splits = {
        "calibration": make_split("calibration", CALIBRATION_SCORES, TEST_LABELS),
        "test": make_split("test", TEST_SCORES, TEST_LABELS),
    }
    by_type = {
        "calibration": {"crack": {"n": 5, "escapes": 0, "recall": 1.0, "image_auroc": 0.99}},
        "test": {
            "crack": {"n": 3, "escapes": 1, "recall": 2 / 3, "image_auroc": 0.9},
            "stain": {"n": 2, "escapes": 2, "recall": 0.0, "image_auroc": None},
        },
    }
    metrics = {name: split_metrics(by_defect_type=table) for name, table in by_type.items()}
    html = render_report(tmp_path, make_inputs(splits, metrics)).read_text(encoding="utf-8")
    start = html.index('id="defect-types"')
    table = html[start : html.find("</section>", start)]
    rows = re.findall(r"<tr><td>([^<]+)</td>((?:<td class=\"v\">[^<]*</td>)+)</tr>", table)
    cells = {name: re.findall(r'<td class="v">([^<]*)</td>', values) for name, values in rows}
    assert cells == {
        "crack": ["5 of 5 caught · 100.0\u00a0% · AUROC 0.990", "2 of 3 caught · 66.7\u00a0% · AUROC 0.900"],
        "stain": ["—", "0 of 2 caught · 0.0\u00a0% · AUROC —"],
    }
    assert "By defect type" not in html  # the nested table is not also printed as a metric row


def test_one_defect_type_adds_no_table(report: tuple[Path, str], tmp_path: Path) -> None:
    _, html = report
    assert 'id="defect-types"' not in html
    splits = {"test": make_split("test", TEST_SCORES, TEST_LABELS)}
    metrics = {
        "test": split_metrics(by_defect_type={"scratch": {"n": 5, "escapes": 1, "recall": 0.8, "image_auroc": 0.9}})
    }
    html = render_report(tmp_path, make_inputs(splits, metrics)).read_text(encoding="utf-8")
    assert 'id="defect-types"' not in html
