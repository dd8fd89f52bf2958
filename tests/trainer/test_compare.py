"""`lineguard-train compare`: every model on one dataset, side by side in comparison.json and .html."""

import json
import math
from pathlib import Path

import pytest

from lineguard.trainer.__main__ import main
from lineguard.trainer.compare import ModelRow, _type_table, pick_line
from lineguard.trainer.sample_data import DEFECT_TYPES

MODELS = ("patchcore", "fastflow", "fcdd")
RATIOS = ("image_auroc", "average_precision", "f1", "pixel_auroc", "aupro", "false_reject_rate", "recall")


@pytest.fixture(scope="module")
def compared(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT after one small compare run; --epochs, --flow-steps and --bank-size reach only the models that have them."""
    out = tmp_path_factory.mktemp("compare")
    options = ["--image-size", "64", "--epochs", "2", "--flow-steps", "2", "--bank-size", "256"]
    assert main(["compare", str(sample_root), "--out", str(out), "--models", ",".join(MODELS), *options]) == 0
    return out


@pytest.mark.slow
def test_comparison_json_has_one_row_per_model_with_measured_numbers(compared: Path):
    document = json.loads((compared / "comparison.json").read_text())
    rows = {row["model"]: row for row in document["models"]}
    assert list(rows) == list(MODELS)
    for name, row in rows.items():
        for key in RATIOS:
            assert isinstance(row[key], float) and math.isfinite(row[key]) and 0.0 <= row[key] <= 1.0, (name, key)
        assert row["cpu_ms_per_image"] > 0 and row["train_s"] > 0
        assert set(row["recall_by_defect_type"]) == set(DEFECT_TYPES), name
        files = [path for path in (compared / name / "bundle").rglob("*") if path.is_file()]
        assert row["bundle_bytes"] == sum(path.stat().st_size for path in files) > 0
    assert rows["patchcore"]["variable_size"] is False and rows["fcdd"]["variable_size"] is True
    assert document["cpu"]["timed_runs"] >= 10 and document["cpu"]["batch_size"] == 1
    assert document["pick"].startswith("Pick ") and "fastest:" in document["pick"]


@pytest.mark.slow
def test_comparison_html_shows_the_table_both_charts_and_links_each_report(compared: Path):
    html = (compared / "comparison.html").read_text()
    for name in MODELS:
        assert f'href="{name}/report/index.html"' in html
        assert (compared / name / "report" / "index.html").is_file()
    for chart in ("comparison-assets/roc.png", "comparison-assets/pr.png"):
        assert chart in html and (compared / chart).is_file()
    assert 'class="v best"' in html and "Pick " in html
    start = html.index('id="defect-types"')
    kinds_table = html[start : html.index("</section>", start)]
    assert all(f'<th class="v">{kind}</th>' in kinds_table for kind in DEFECT_TYPES)
    assert kinds_table.count("<tr><td>") == len(MODELS)


def test_recall_by_defect_type_marks_the_best_model_per_kind_and_needs_two_kinds():
    rows = [
        ModelRow(
            "a", None, None, None, None, None, None, None, 0.5, 1.0, 1.0, 1, False, "", {"crack": 0.5, "stain": 1.0}
        ),
        ModelRow("b", None, None, None, None, None, None, None, 0.5, 1.0, 1.0, 1, False, "", {"crack": 0.75}),
    ]
    kinds, cells = _type_table(rows)
    assert kinds == ["crack", "stain"]
    assert cells == [[("50.0\u00a0%", False), ("100.0\u00a0%", False)], [("75.0\u00a0%", True), ("—", False)]]
    assert _type_table(rows[1:]) == ([], [])


def test_an_unknown_model_exits_2_and_names_the_valid_ones(sample_root: Path, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(sample_root), "--out", str(tmp_path / "out"), "--models", "patchcore,resnet"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "'resnet'" in error and all(name in error for name in MODELS)
    assert not (tmp_path / "out").exists()


def _row(model: str, auroc: float | None, ms: float, n_bytes: int) -> ModelRow:
    return ModelRow(model, auroc, None, None, None, None, None, None, 0.5, 1.0, ms, n_bytes, False, "")


def test_the_pick_is_the_fastest_model_within_the_auroc_margin_of_the_best():
    rows = [_row("a", 0.95, 20.0, 5_000_000), _row("b", 0.945, 4.0, 900_000), _row("c", 0.80, 1.0, 300_000)]
    line = pick_line(rows)
    assert line.startswith("Pick b: fastest of the models within")
    assert "best test AUROC: a (0.950)" in line and "fastest: c" in line and "smallest bundle: c (300.0 kB)" in line


def test_without_a_test_auroc_the_pick_is_the_fastest():
    assert pick_line([_row("a", None, 9.0, 10), _row("b", None, 3.0, 20)]).startswith("Pick b: no test AUROC")


def test_a_variant_is_its_model_kind_with_its_own_settings_over_the_shared_options(tmp_path: Path):
    from lineguard.trainer.__main__ import _model_configs, build_parser

    argv = ["compare", str(tmp_path), "--out", str(tmp_path / "out"), "--channels", "1", "--image-size", "128"]
    args = build_parser().parse_args([*argv, "--models", "patchcore,patchcore-regions,fastflow"])
    configs = _model_configs(args)
    assert list(configs) == ["patchcore", "patchcore-regions", "fastflow"]
    assert configs["patchcore"].regions == 1 and configs["patchcore-regions"].regions == 2
    assert configs["patchcore-regions"].input_height == 128 and configs["patchcore-regions"].channels == 1
