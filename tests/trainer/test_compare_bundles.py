"""compare-bundles: two real bundles scored on the same labelled images through the CLI, page and JSON checked."""

from __future__ import annotations

import json

from bundle_tools import bundle_variant

from lineguard.agent.signing import public_key_path
from lineguard.trainer.__main__ import main


def compare(old, new, data, out, *extra: str) -> int:
    return main(["compare-bundles", str(old), str(new), "--data", str(data), "--out", str(out), *extra])


def test_a_bundle_against_itself_changes_nothing_and_counts_as_the_trainer_did(
    trained_work, sample_root, signing_key, tmp_path, capsys
):
    bundle = trained_work / "bundle"
    code = compare(bundle, bundle, sample_root, tmp_path / "same", "--trusted-key", str(public_key_path(signing_key)))
    assert code == 0
    printed = capsys.readouterr().out
    assert "0 of" in printed and "ESCAPES RISE" not in printed
    document = json.loads((tmp_path / "same" / "compare.json").read_text())
    assert document["changed"] == [] and document["escapes_rise"] is False and document["signatures_checked"] is True
    test_split = next(group for group in document["groups"] if group["name"] == "split test")
    metrics = json.loads((trained_work / "report" / "metrics.json").read_text())["test"]
    assert test_split["old"]["false_rejects"]["count"] == metrics["confusion"]["fp"]
    assert test_split["old"]["escapes"]["count"] == metrics["confusion"]["fn"]
    interval = test_split["old"]["false_rejects"]
    assert 0.0 <= interval["low"] <= interval["rate"] <= interval["high"] <= 1.0
    assert (tmp_path / "same" / "compare.html").read_text().count("Both bundles give every image the same verdict") == 1


def test_a_new_bundle_whose_escapes_rise_is_flagged_in_red_with_the_images_it_now_misses(
    trained_work, sample_root, tmp_path, capsys
):
    bundle = trained_work / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    lax = 1e6  # accepts every defect
    threshold = {**manifest["threshold"], "value": lax, "method": f"manual:{lax}"}
    new = bundle_variant(bundle, tmp_path / "lax", None, model_version="1.0.1", threshold=threshold)
    assert compare(bundle, new, sample_root, tmp_path / "cmp") == 0
    assert "ESCAPES RISE with brick-test@1.0.1" in capsys.readouterr().out
    document = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert document["escapes_rise"] is True and document["signatures_checked"] is False
    overall = document["groups"][0]
    assert overall["new"]["escapes"]["count"] == overall["n_defect"]
    changes = {item["change"] for item in document["changed"]}
    assert "new escape" in changes
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert 'class="verdict alarm"' in page and "new escape" in page
    assert len(list((tmp_path / "cmp" / "compare-assets").glob("*.png"))) == len(document["changed"])


def test_an_altered_bundle_is_refused_when_signatures_are_checked(
    trained_work, sample_root, signing_key, tmp_path, capsys
):
    bundle = trained_work / "bundle"
    unsigned = bundle_variant(bundle, tmp_path / "unsigned", None, model_version="1.0.2")
    code = compare(bundle, unsigned, sample_root, tmp_path / "x", "--trusted-key", str(public_key_path(signing_key)))
    assert code == 2 and "lineguard-train: error:" in capsys.readouterr().err
