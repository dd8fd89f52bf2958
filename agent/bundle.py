"""The model-bundle contract between trainer (writes it) and agent (verifies and runs it).

A bundle is a directory:
    manifest.json   what the model is, its input spec, threshold, metrics and every file's sha256
    manifest.sig    Ed25519 signature over the exact bytes of manifest.json (JSON record)
    model.onnx      raw uint8 frames in; `score` (N) and `anomaly_map` (N, H, W) out
    golden/*.png    images with expected scores, for the canary check before a swap
    engines/*.plan  optional TensorRT engines built from model.onnx, one per GPU kind, TensorRT
                    version and precision (`lineguard-train build-engine`), each with its parity figures
The signature covers the manifest and the manifest covers every file, so one check proves all.
No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .signing import SignatureError, verify

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"


class BundleError(Exception):
    """A bundle is missing, malformed, or its files do not match its manifest."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Record):
    """The frames the ONNX graph takes: (N, height, width, channels) uint8."""

    height: int = Field(gt=0, description="Input height in pixels.")
    width: int = Field(gt=0, description="Input width in pixels.")
    channels: Literal[1, 3] = Field(description="1 = grey (mono8), 3 = RGB (rgb8).")
    dtype: Literal["uint8"] = "uint8"
    layout: Literal["NHWC"] = "NHWC"
    pixel_format: Literal["mono8", "rgb8"] = Field(description="Channel order the graph expects.")
    variable_size: bool = Field(False, description="True when the graph accepts other sizes than height x width.")


class RateEstimate(_Record):
    count: int
    total: int
    rate: float
    low: float
    high: float


class ThresholdSpec(_Record):
    """The calibrated decision rule: reject iff score >= value."""

    value: float
    method: str = Field(description="How it was chosen: f1, youden, fpr:<rate>, recall:<rate>, manual:<value>.")
    confidence: float = 0.95
    n_good: int
    n_defect: int
    false_reject: RateEstimate
    escape: RateEstimate | None = None


class ScoreNormalisation(_Record):
    """Linear map of raw scores to a display scale: (raw - offset) / scale, 0.5 at the threshold."""

    method: Literal["linear"] = "linear"
    offset: float
    scale: float = Field(gt=0)
    map_low: float = Field(description="Anomaly-map value shown as the coldest colour.")
    map_high: float = Field(description="Anomaly-map value shown as the hottest colour.")


class GoldenImage(_Record):
    file: str
    label: Literal["ok", "nok"]
    expected_score: float


class ModelInfo(_Record):
    kind: str = Field(description="Detector: patchcore, fastflow, fcdd.")
    backbone: str
    onnx_file: str = "model.onnx"
    opset: int
    parameters: dict[str, object] = Field(default_factory=dict, description="The model's own settings.")


class DatasetInfo(_Record):
    name: str
    digest: str
    n_train: int
    n_calibration: int
    n_test: int


class EngineParity(_Record):
    """How the engine scored against ONNX Runtime when it was built."""

    n_golden: int = Field(ge=0, description="Golden images compared with their expected scores.")
    max_score_rel_diff: float = Field(ge=0, description="Worst relative score difference on the golden images.")
    score_rtol: float = Field(gt=0, description="The tolerance for this precision.")
    n_verdicts: int = Field(
        ge=0, description="Images whose accept/reject verdicts were compared (golden + calibration)."
    )
    verdicts_changed: int = Field(
        ge=0, description="Verdicts that differ from ONNX Runtime's at the threshold (0 to pass)."
    )


class EngineInfo(_Record):
    """A TensorRT engine built from the bundle's ONNX graph for one GPU kind and TensorRT version."""

    file: str = Field(pattern=r"^engines/[A-Za-z0-9._-]+\.plan$", description="Path of the plan inside the bundle.")
    precision: Literal["fp32", "fp16", "int8"]
    search_precision: Literal["fp32", "fp16"] = Field(description="Precision of the memory-bank search layers.")
    gpu_name: str = Field(min_length=1, description="GPU the engine was built on, as the driver names it.")
    compute_capability: str = Field(pattern=r"^[0-9]+\.[0-9]+$", description="e.g. 9.0 for Hopper, 8.7 for Orin.")
    tensorrt_version: str = Field(
        pattern=r"^[0-9]+(\.[0-9]+)*$", description="TensorRT that built it; plans only load on the same version."
    )
    max_batch: int = Field(
        ge=1, description="Largest batch of the optimisation profile (the agent's engine.max_batch)."
    )
    built_utc: str
    parity: EngineParity


ANY = "*"


class Targets(_Record):
    """Where a bundle may serve: agents, lines and cameras by name; "*" = any. Signed with the manifest."""

    lines: tuple[str, ...] = Field((ANY,), min_length=1, description="Production lines, or * for any.")
    agents: tuple[str, ...] = Field((ANY,), min_length=1, description="Agent ids, or * for any.")
    cameras: tuple[str, ...] = Field((ANY,), min_length=1, description="Camera names, or * for any.")

    def refusal(self, *, line: str, agent_id: str, cameras: Sequence[str]) -> str:
        """Why this bundle may not serve on that agent ("" when it may)."""
        if ANY not in self.agents and agent_id not in self.agents:
            return f"the bundle is for agents {', '.join(self.agents)}, not {agent_id}"
        if ANY not in self.lines and line not in self.lines:
            return f"the bundle is for lines {', '.join(self.lines)}, not {line}"
        if ANY not in self.cameras and not set(cameras) & set(self.cameras):
            return f"the bundle is for cameras {', '.join(self.cameras)}; this agent has {', '.join(cameras)}"
        return ""

    def text(self) -> str:
        parts = [f"{kind} {', '.join(names)}" for kind, names in self.model_dump().items() if tuple(names) != (ANY,)]
        return "; ".join(parts) or "any agent"


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key for model versions: parts compare one by one, numbers as numbers (1.10 > 1.9).

    The trainer's default versions (UTC timestamps, 20261204T151200Z) sort by time.
    """
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"[0-9]+|[A-Za-z]+", version))


class Manifest(_Record):
    schema_version: int = Field(SCHEMA_VERSION, description="Bundle format version.")
    model_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    model_version: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._+-]+$")
    created_utc: str
    trainer_version: str
    dataset: DatasetInfo
    model: ModelInfo
    input: InputSpec
    threshold: ThresholdSpec
    score_normalisation: ScoreNormalisation
    metrics: dict[str, dict[str, object]] = Field(description="metrics.json of the report: calibration and test.")
    golden: tuple[GoldenImage, ...]
    files: dict[str, str] = Field(description="Relative path -> sha256 of every file but the manifest and signature.")
    engines: tuple[EngineInfo, ...] = Field((), description="TensorRT engines built for this model; none = ONNX only.")
    targets: Targets = Field(default_factory=Targets, description="Where the bundle may serve (signed).")


def manifest_json(manifest: Manifest) -> bytes:
    """The canonical bytes of manifest.json (what the signature covers).

    An empty `engines` list is left out, so a bundle without engines stays readable by agents
    that predate them (they refuse unknown keys).
    """
    data = manifest.model_dump(mode="json")
    if not data["engines"]:
        del data["engines"]
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def parse_manifest(data: bytes, *, source: str = MANIFEST_FILE) -> Manifest:
    """Parse and validate manifest bytes; BundleError names the bad key."""
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        msg = f"{source} is not valid JSON ({error}); the bundle is corrupt: rebuild or re-push it"
        raise BundleError(msg) from error
    if isinstance(raw, dict) and raw.get("schema_version") != SCHEMA_VERSION:
        msg = (
            f"{source} has schema_version {raw.get('schema_version')!r}; this agent reads version {SCHEMA_VERSION}: "
            "retrain with a matching trainer or upgrade the agent"
        )
        raise BundleError(msg)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        msg = f"{source} does not match the bundle schema: {problems}"
        raise BundleError(msg) from error


def verify_bundle(
    bundle_dir: Path, trusted_keys: Iterable[Ed25519PublicKey], *, require_signature: bool = True
) -> Manifest:
    """Check signature, then every file digest; return the manifest of a bundle safe to load.

    Raises SignatureError (unsigned, untrusted, or altered manifest) or BundleError (missing,
    extra or altered files; malformed manifest).
    """
    manifest_path = bundle_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        msg = f"{bundle_dir} is not a model bundle: {MANIFEST_FILE} is missing"
        raise BundleError(msg)
    manifest_bytes = manifest_path.read_bytes()
    signature_path = bundle_dir / SIGNATURE_FILE
    if signature_path.is_file():
        try:
            signature = json.loads(signature_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            msg = f"{signature_path} is not a signature record; re-sign the bundle"
            raise SignatureError(msg) from error
        verify(manifest_bytes, signature, trusted_keys)
    elif require_signature:
        msg = (
            f"{bundle_dir} is unsigned ({SIGNATURE_FILE} missing); sign it with `lineguard-train bundle --sign-key KEY`"
        )
        raise SignatureError(msg)
    else:
        log.warning("bundle %s is unsigned; accepted because signatures are not required", bundle_dir)
    manifest = parse_manifest(manifest_bytes, source=str(manifest_path))
    _check_files(bundle_dir, manifest)
    return manifest


def read_verified(bundle_dir: Path, manifest: Manifest, relative: str) -> bytes:
    """The bytes of one listed file, checked against the manifest: what is loaded is exactly what was hashed.

    Loaders use these bytes, never the path again, so a file swapped after verify_bundle cannot slip in (and an
    ONNX graph loaded from bytes cannot pull external data from outside the bundle)."""
    expected = manifest.files.get(relative)
    if expected is None:
        msg = f"{relative} is not among the files of the bundle {bundle_dir}; rebuild the bundle"
        raise BundleError(msg)
    data = (bundle_dir / relative).read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        msg = f"{relative} in {bundle_dir} changed after the bundle was verified; reinstall it"
        raise BundleError(msg)
    return data


def read_checked_files(bundle_dir: Path) -> Manifest:
    """The manifest of a bundle whose files all match their digests; its signature is NOT checked.

    For offline work on a trainer's machine (comparing bundles) when no trusted key is at hand; agents always
    use verify_bundle.
    """
    manifest_path = bundle_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        msg = f"{bundle_dir} is not a model bundle: {MANIFEST_FILE} is missing"
        raise BundleError(msg)
    manifest = parse_manifest(manifest_path.read_bytes(), source=str(manifest_path))
    _check_files(bundle_dir, manifest)
    return manifest


def _check_files(bundle_dir: Path, manifest: Manifest) -> None:
    # Only the top-level manifest and signature are exempt: a manifest.json in a subfolder must be listed too.
    exempt = {MANIFEST_FILE, SIGNATURE_FILE}
    present = {
        relative
        for p in bundle_dir.rglob("*")
        if p.is_file() and (relative := p.relative_to(bundle_dir).as_posix()) not in exempt
    }
    if not_files := sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_symlink()):
        msg = f"bundle {bundle_dir} holds symbolic links ({', '.join(not_files)}); a bundle holds plain files only"
        raise BundleError(msg)
    listed = set(manifest.files)
    if missing := sorted(listed - present):
        msg = f"bundle {bundle_dir} lacks files its manifest lists: {', '.join(missing)}; re-copy the whole bundle"
        raise BundleError(msg)
    if extra := sorted(present - listed):
        msg = f"bundle {bundle_dir} holds files its manifest does not list: {', '.join(extra)}; remove them or rebuild"
        raise BundleError(msg)
    for relative, expected in sorted(manifest.files.items()):
        actual = file_sha256(bundle_dir / relative)
        if actual != expected:
            msg = f"{relative} in {bundle_dir} has sha256 {actual[:12]}…, manifest says {expected[:12]}…: the file was altered"
            raise BundleError(msg)
    for name in (manifest.model.onnx_file, *(g.file for g in manifest.golden), *(e.file for e in manifest.engines)):
        if name not in listed:
            msg = f"manifest names {name}, which is not among its files; rebuild the bundle"
            raise BundleError(msg)


__all__ = [
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "SIGNATURE_FILE",
    "BundleError",
    "EngineInfo",
    "EngineParity",
    "InputSpec",
    "Manifest",
    "SignatureError",
    "Targets",
    "ThresholdSpec",
    "file_sha256",
    "manifest_json",
    "parse_manifest",
    "read_checked_files",
    "read_verified",
    "verify_bundle",
    "version_key",
]
