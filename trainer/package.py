"""Write and sign the model bundle the agent runs (format: lineguard.agent.bundle).

The threshold, how it was chosen, the input spec, normalisation and metrics all live in
manifest.json beside the ONNX graph, so nothing is lost after export. Golden images are
stored at the model's input size as PNG (lossless), with the scores ONNX Runtime gives them.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lineguard import __version__
from lineguard.agent.bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    BundleError,
    DatasetInfo,
    EngineInfo,
    GoldenImage,
    InputSpec,
    Manifest,
    ModelInfo,
    ScoreNormalisation,
    Targets,
    ThresholdSpec,
    file_sha256,
    manifest_json,
    verify_bundle,
)
from lineguard.agent.signing import SignatureError, key_id, load_private_key, sign

from .export import cpu_session, run_onnx
from .scoring import SplitScores

log = logging.getLogger(__name__)

GOLDEN_PER_CLASS = 4


@dataclass(frozen=True, slots=True)
class BundleContents:
    """Everything a bundle is made of, gathered by the pipeline."""

    model_id: str
    model_version: str
    onnx_path: Path
    model_info: ModelInfo
    input_spec: InputSpec
    dataset: DatasetInfo
    calibration: dict[str, object]  # Calibration.to_dict()
    metrics: dict[str, dict[str, object]]
    calibration_split: SplitScores
    targets: Targets


def write_bundle(bundle_dir: Path, contents: BundleContents, *, sign_key: Path | None) -> Manifest:
    """Write a complete bundle into bundle_dir (replaced if present); sign it when sign_key is given."""
    if bundle_dir.exists():
        shutil.rmtree(bundle_dir)
    (bundle_dir / "golden").mkdir(parents=True)
    shutil.copyfile(contents.onnx_path, bundle_dir / contents.model_info.onnx_file)
    golden = _write_golden_images(bundle_dir, contents.calibration_split, bundle_dir / contents.model_info.onnx_file)
    files = {p.relative_to(bundle_dir).as_posix(): file_sha256(p) for p in sorted(bundle_dir.rglob("*")) if p.is_file()}
    threshold = ThresholdSpec(value=contents.calibration["threshold"], **_threshold_fields(contents.calibration))
    manifest = Manifest(
        model_id=contents.model_id,
        model_version=contents.model_version,
        created_utc=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        trainer_version=__version__,
        dataset=contents.dataset,
        model=contents.model_info,
        input=contents.input_spec,
        threshold=threshold,
        score_normalisation=score_normalisation(contents.calibration_split, threshold.value),
        metrics=contents.metrics,
        golden=tuple(golden),
        files=files,
        targets=contents.targets,
    )
    _write_manifest(bundle_dir, manifest, sign_key=sign_key)
    return manifest


def _write_manifest(bundle_dir: Path, manifest: Manifest, *, sign_key: Path | None) -> None:
    """Write manifest.json and, with a key, manifest.sig; each file is replaced atomically."""
    manifest_bytes = manifest_json(manifest)
    _replace_file(bundle_dir / MANIFEST_FILE, manifest_bytes)
    if sign_key is not None:
        record = sign(manifest_bytes, load_private_key(sign_key))
        _replace_file(bundle_dir / SIGNATURE_FILE, (json.dumps(record, indent=2) + "\n").encode())
        log.info("bundle %s signed by key %s", bundle_dir, record["key_id"])
    else:
        log.warning(
            "bundle %s is UNSIGNED: agents refuse it unless signatures are disabled; pass --sign-key", bundle_dir
        )


def _replace_file(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


def _public_keys_of(sign_key: Path | None) -> list[Ed25519PublicKey]:
    """The public half of sign_key as a trusted-keys list; empty without a key."""
    return [load_private_key(sign_key).public_key()] if sign_key is not None else []


def check_engine_target(bundle_dir: Path, *, sign_key: Path | None) -> Manifest:
    """Verify a bundle an engine is to be added to; the manifest, or why it cannot take one.

    A signed bundle must come with the key that signed it (its new manifest is re-signed), so
    adding an engine can never launder an altered bundle. Run before a long build, and again
    before the engine is written.
    """
    if (bundle_dir / SIGNATURE_FILE).is_file() and sign_key is None:
        msg = f"{bundle_dir} is signed: pass --sign-key with the key that signed it, so the new manifest is signed too"
        raise BundleError(msg)
    trusted = _public_keys_of(sign_key)
    try:
        return verify_bundle(bundle_dir, trusted, require_signature=False)
    except SignatureError as error:
        msg = f"{bundle_dir} does not verify with --sign-key {sign_key} (key {key_id(trusted[0])}): {error}"
        raise SignatureError(msg) from error


def add_engine(bundle_dir: Path, plan: bytes, info: EngineInfo, *, sign_key: Path | None) -> Manifest:
    """Put a TensorRT plan into a bundle at info.file, list it in the manifest and re-sign.

    An engine already listed under the same file is replaced. Returns the re-verified manifest.
    """
    manifest = check_engine_target(bundle_dir, sign_key=sign_key)
    plan_path = bundle_dir / info.file
    plan_path.parent.mkdir(exist_ok=True)
    _replace_file(plan_path, plan)
    updated = Manifest.model_validate(
        {
            **manifest.model_dump(),
            "files": {**manifest.files, info.file: file_sha256(plan_path)},
            "engines": (*(e for e in manifest.engines if e.file != info.file), info),
        }
    )
    _write_manifest(bundle_dir, updated, sign_key=sign_key)
    trusted = _public_keys_of(sign_key)
    return verify_bundle(bundle_dir, trusted, require_signature=sign_key is not None)


def _threshold_fields(calibration: dict[str, object]) -> dict[str, object]:
    keys = ("method", "confidence", "n_good", "n_defect", "false_reject", "escape")
    return {key: calibration[key] for key in keys}


def _write_golden_images(bundle_dir: Path, split: SplitScores, onnx_path: Path) -> list[GoldenImage]:
    """Pick the calibration images that span the score range and record ONNX Runtime's scores."""
    chosen: list[int] = []
    for label in (0, 1):
        indices = np.flatnonzero(split.labels == label)
        if len(indices) == 0:
            continue
        ordered = indices[np.argsort(split.scores[indices], kind="stable")]
        picks = np.linspace(0, len(ordered) - 1, min(GOLDEN_PER_CLASS, len(ordered))).round().astype(int)
        chosen.extend(int(ordered[i]) for i in dict.fromkeys(picks))
    images = split.images[chosen]
    expected, _ = run_onnx(cpu_session(onnx_path), images)
    golden = []
    for order, (index, image) in enumerate(zip(chosen, images, strict=True)):
        name = f"golden/{order:02d}.png"
        pixels = image[:, :, 0] if image.shape[2] == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(bundle_dir / name), pixels):
            msg = f"cannot write golden image {bundle_dir / name}"
            raise OSError(msg)
        verdict = "nok" if split.labels[index] else "ok"
        golden.append(GoldenImage(file=name, label=verdict, expected_score=float(expected[order])))
    return golden


def score_normalisation(split: SplitScores, threshold: float) -> ScoreNormalisation:
    """Map the median good score to 0 and the threshold to 0.5; map colours from good floor to hot top."""
    good = split.scores[split.labels == 0]
    offset = float(np.median(good)) if len(good) else float(np.min(split.scores))
    scale = 2.0 * (threshold - offset)
    if scale <= 0:
        scale = max(float(np.std(split.scores)) * 4.0, 1e-6)
    map_low = float(np.percentile(split.maps[split.labels == 0], 1)) if len(good) else float(split.maps.min())
    map_high = max(float(np.percentile(split.maps, 99.9)), threshold, map_low + 1e-6)
    return ScoreNormalisation(offset=offset, scale=scale, map_low=map_low, map_high=map_high)
