"""`lineguard-train` as a user runs it: one `run`, single steps, and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lineguard.agent.bundle import verify_bundle
from lineguard.agent.signing import load_public_key, public_key_path
from lineguard.trainer.__main__ import main
from lineguard.trainer.sample_data import DEFECT_TYPES

METRIC_KEYS = {"image_auroc", "average_precision", "f1", "precision", "recall", "fpr", "threshold", "confusion"}


def test_run_writes_report_metrics_onnx_and_a_signed_bundle(trained_work: Path, signing_key: Path):
    metrics = json.loads((trained_work / "report" / "metrics.json").read_text())
    for split in ("calibration", "test"):
        assert METRIC_KEYS | {"pixel_auroc", "aupro"} <= set(metrics[split])
        assert set(metrics[split]["confusion"]) == {"tn", "fp", "fn", "tp"}
    assert metrics["test"]["image_auroc"] >= 0.9
    assert metrics["test"]["pixel_auroc"] >= 0.9
    by_type = metrics["test"]["by_defect_type"]
    assert set(by_type) == set(DEFECT_TYPES)
    assert sum(entry["n"] for entry in by_type.values()) == metrics["test"]["n_defect"]
    assert sum(entry["escapes"] for entry in by_type.values()) == metrics["test"]["confusion"]["fn"]
    html = (trained_work / "report" / "index.html").read_text()
    assert "Image AUROC" in html and "assets/test_roc.png" in html
    assert 'id="defect-types"' in html
    parity = json.loads((trained_work / "export" / "parity.json").read_text())
    assert parity["max_score_rel_diff"] <= 1e-4
    manifest = verify_bundle(trained_work / "bundle", [load_public_key(public_key_path(signing_key))])
    assert manifest.threshold.value == pytest.approx(metrics["test"]["threshold"])


def test_golden_scores_in_the_bundle_are_what_onnx_runtime_gives_the_stored_pngs(trained_work: Path):
    import cv2
    import numpy as np

    from lineguard.trainer.export import cpu_session, run_onnx

    manifest = json.loads((trained_work / "bundle" / "manifest.json").read_text())
    session = cpu_session(trained_work / "bundle" / "model.onnx")
    for golden in manifest["golden"]:
        image = cv2.imread(str(trained_work / "bundle" / golden["file"]), cv2.IMREAD_GRAYSCALE)
        score, _ = run_onnx(session, image[np.newaxis, :, :, np.newaxis])
        assert float(score[0]) == pytest.approx(golden["expected_score"], rel=1e-5)


def test_a_single_step_reruns_calibration_with_another_method(trained_work: Path, sample_root: Path, tmp_path):
    import shutil

    work = Path(shutil.copytree(trained_work, tmp_path / "work"))
    assert main(["calibrate", str(sample_root), "--out", str(work), "--threshold", "fpr:0.0"]) == 0
    calibration = json.loads((work / "calibration.json").read_text())
    assert calibration["method"] == "fpr:0.0" and calibration["false_reject"]["count"] == 0
    assert main(["evaluate", str(sample_root), "--out", str(work)]) == 0
    assert main(["report", "--out", str(work)]) == 0
    assert main(["bundle", "--out", str(work)]) == 0  # unsigned: allowed, with a warning
    assert not (work / "bundle" / "manifest.sig").exists()


def test_a_step_before_its_inputs_exist_says_which_step_to_run(tmp_path, capsys):
    assert main(["export", "--out", str(tmp_path)]) == 2
    assert "run `lineguard-train fit`" in capsys.readouterr().err


def test_a_bad_dataset_exits_2_with_the_fix(tmp_path, capsys):
    (tmp_path / "data" / "test").mkdir(parents=True)
    assert main(["run", str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 2
    assert "train/good" in capsys.readouterr().err


def test_a_bad_threshold_method_exits_2_and_lists_the_valid_forms(trained_work, sample_root, tmp_path, capsys):
    assert main(["calibrate", str(sample_root), "--out", str(trained_work), "--threshold", "best"]) == 2
    assert "fpr:<rate>" in capsys.readouterr().err


def test_the_console_script_is_installed_and_answers_help():
    result = subprocess.run(
        [Path(sys.executable).with_name("lineguard-train"), "--help"], capture_output=True, text=True, check=True
    )
    for command in ("run", "fit", "calibrate", "evaluate", "export", "bundle", "report", "keygen", "make-sample-data"):
        assert command in result.stdout


def test_keygen_writes_a_key_pair(tmp_path):
    assert main(["keygen", str(tmp_path / "op.pem")]) == 0
    assert (tmp_path / "op.pem").exists() and (tmp_path / "op.pub").exists()
    assert main(["keygen", str(tmp_path / "op.pem")]) == 2  # never overwrite silently


def test_an_option_of_another_model_is_refused_with_the_fix(sample_root, tmp_path, capsys):
    code = main(["fit", str(sample_root), "--out", str(tmp_path), "--model", "fastflow", "--bank-size", "512"])
    assert code == 2
    assert "--bank-size do(es) not apply to fastflow" in capsys.readouterr().err
