"""The bundle contract: the agent accepts exactly what a trusted trainer signed, nothing else."""

import json
import shutil
from pathlib import Path

import pytest

from lineguard.agent.bundle import MANIFEST_FILE, SIGNATURE_FILE, BundleError, verify_bundle
from lineguard.agent.signing import SignatureError, generate_key_pair, load_public_key, public_key_path


@pytest.fixture
def bundle_copy(trained_work: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_work / "bundle", tmp_path / "bundle"))


@pytest.fixture
def trusted(signing_key: Path):
    return [load_public_key(public_key_path(signing_key))]


def test_a_signed_bundle_verifies_and_carries_its_threshold_and_input_spec(bundle_copy, trusted):
    manifest = verify_bundle(bundle_copy, trusted)
    assert manifest.model_id == "brick-test" and manifest.model_version == "1.0.0"
    assert manifest.input.channels == 1 and manifest.input.pixel_format == "mono8"
    assert (manifest.input.height, manifest.input.width) == (256, 256)
    assert manifest.threshold.method == "f1"
    assert manifest.metrics["test"]["image_auroc"] is not None
    assert {g.label for g in manifest.golden} == {"ok", "nok"}
    assert set(manifest.files) == {"model.onnx", *(g.file for g in manifest.golden)}


def test_a_tampered_model_file_is_refused(bundle_copy, trusted):
    with (bundle_copy / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match=r"model\.onnx .* was altered"):
        verify_bundle(bundle_copy, trusted)


def test_a_tampered_golden_image_is_refused(bundle_copy, trusted):
    golden = sorted((bundle_copy / "golden").iterdir())[0]
    golden.write_bytes(golden.read_bytes()[:-1] + b"\1")
    with pytest.raises(BundleError, match="was altered"):
        verify_bundle(bundle_copy, trusted)


def test_a_tampered_manifest_is_refused_by_its_signature(bundle_copy, trusted):
    manifest = json.loads((bundle_copy / MANIFEST_FILE).read_text())
    manifest["threshold"]["value"] = 1e9  # an attacker lowering the reject rate
    (bundle_copy / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with pytest.raises(SignatureError, match="altered after signing"):
        verify_bundle(bundle_copy, trusted)


def test_an_unsigned_bundle_is_refused_unless_signatures_are_optional(bundle_copy, trusted):
    (bundle_copy / SIGNATURE_FILE).unlink()
    with pytest.raises(SignatureError, match="unsigned"):
        verify_bundle(bundle_copy, trusted)
    assert verify_bundle(bundle_copy, trusted, require_signature=False).model_id == "brick-test"


def test_a_bundle_signed_by_an_untrusted_key_is_refused(bundle_copy, tmp_path):
    other, _ = generate_key_pair(tmp_path / "other.pem")
    with pytest.raises(SignatureError, match="not trusted here"):
        verify_bundle(bundle_copy, [load_public_key(public_key_path(other))])


def test_an_extra_or_missing_file_is_refused(bundle_copy, trusted):
    (bundle_copy / "golden" / "extra.png").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"does not list: golden/extra.png"):
        verify_bundle(bundle_copy, trusted)
    (bundle_copy / "golden" / "extra.png").unlink()
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"lacks files its manifest lists: model\.onnx"):
        verify_bundle(bundle_copy, trusted)


def test_a_directory_without_a_manifest_is_not_a_bundle(tmp_path, trusted):
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        verify_bundle(tmp_path, trusted)


def test_a_manifest_of_another_schema_version_says_what_to_do(bundle_copy, trusted):
    manifest = json.loads((bundle_copy / MANIFEST_FILE).read_text())
    manifest["schema_version"] = 99
    (bundle_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    (bundle_copy / SIGNATURE_FILE).unlink()
    with pytest.raises(BundleError, match="schema_version 99"):
        verify_bundle(bundle_copy, trusted, require_signature=False)
