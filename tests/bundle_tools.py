"""Test helpers that make variants of a real bundle: another version, a broken canary, tampering, a (fake) engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fake_gpu import fake_plan

from lineguard.agent.bundle import MANIFEST_FILE, SIGNATURE_FILE, EngineInfo, EngineParity
from lineguard.agent.engine.gpu import gpu_slug, short_version
from lineguard.agent.signing import load_private_key, sign


def bundle_variant(source: Path, dest: Path, signing_key: Path | None, **manifest_changes: Any) -> Path:
    """Copy a bundle, change top-level manifest keys (or golden scores via golden_scale), re-sign."""
    shutil.copytree(source, dest)
    manifest = json.loads((dest / MANIFEST_FILE).read_text())
    scale = manifest_changes.pop("golden_scale", None)
    if scale is not None:
        for golden in manifest["golden"]:
            golden["expected_score"] *= scale
    manifest.update(manifest_changes)
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (dest / MANIFEST_FILE).write_bytes(data)
    (dest / SIGNATURE_FILE).unlink(missing_ok=True)
    if signing_key is not None:
        (dest / SIGNATURE_FILE).write_text(json.dumps(sign(data, load_private_key(signing_key))))
    return dest


def engine_info(
    precision: str = "fp16",
    *,
    gpu: str = "NVIDIA H200",
    cc: str = "9.0",
    trt: str = "10.3.0.26",
    max_batch: int = 8,
    rtol: float = 1e-2,
) -> EngineInfo:
    """The manifest entry of a TensorRT engine built for `gpu` with TensorRT `trt`, with passing parity figures."""
    parity = EngineParity(n_golden=8, max_score_rel_diff=1e-4, score_rtol=rtol, n_verdicts=8, verdicts_changed=0)
    return EngineInfo(
        file=f"engines/{gpu_slug(gpu)}-sm{cc.replace('.', '')}-trt{short_version(trt)}-{precision}.plan",
        precision=precision,
        search_precision="fp32" if precision == "fp32" else "fp16",
        gpu_name=gpu,
        compute_capability=cc,
        tensorrt_version=trt,
        max_batch=max_batch,
        built_utc="2026-11-30T00:00:00Z",
        parity=parity,
    )


def with_fake_engine(source: Path, dest: Path, signing_key: Path) -> Path:
    """Copy a bundle and add a fake fp16 TensorRT engine for an H200 (tests/fake_gpu.py runs it), batch <= 4; re-sign."""
    from lineguard.trainer.package import add_engine  # trainer code: only the tests that need an engine import it

    bundle = Path(shutil.copytree(source, dest))
    plan = fake_plan(bundle / "model.onnx", max_batch=4, input_shape=(256, 256, 1))
    add_engine(bundle, plan, engine_info("fp16", max_batch=4), sign_key=signing_key)
    return bundle
