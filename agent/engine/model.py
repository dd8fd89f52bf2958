"""A verified bundle ready to score frames: signature and digests checked, back end open, canary passed."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..bundle import BundleError, Manifest, verify_bundle
from .backends import Backend, load_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CanaryResult:
    """How the bundle's golden images scored here against the trainer's expected scores."""

    passed: bool
    worst_rel_diff: float
    tolerance: float
    n_images: int


class ServingModel:
    """A bundle's model on an inference back end; constructing it performs every check."""

    def __init__(
        self,
        bundle_dir: Path,
        *,
        trusted_keys: Sequence[Ed25519PublicKey],
        require_signature: bool = True,
        backend: str = "auto",
        threads: int = 0,
        canary_rtol: float = 1e-3,
    ) -> None:
        self.bundle_dir = bundle_dir
        self.manifest: Manifest = verify_bundle(bundle_dir, trusted_keys, require_signature=require_signature)
        self.backend: Backend = load_backend(backend, bundle_dir / self.manifest.model.onnx_file, threads=threads)
        spec = self.manifest.input
        self.input_shape = (spec.height, spec.width, spec.channels)
        self.backend.infer(np.zeros((1, *self.input_shape), np.uint8))  # warm-up: first-run allocations
        self.canary = self._run_canary(canary_rtol)
        if not self.canary.passed:
            self.backend.close()
            msg = (
                f"canary failed for {self.label}: golden images score {self.canary.worst_rel_diff:.2e} relative off "
                f"(tolerance {canary_rtol:.0e}) on {self.backend.name}; the bundle or this runtime is broken"
            )
            raise BundleError(msg)
        log.info("serving %s on %s; canary %.1e", self.label, self.backend.name, self.canary.worst_rel_diff)

    @property
    def label(self) -> str:
        """`model_id@model_version`, the name every verdict carries."""
        return f"{self.manifest.model_id}@{self.manifest.model_version}"

    @property
    def threshold(self) -> float:
        return self.manifest.threshold.value

    def infer(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """frames: (N, H, W, C) uint8 at the input size -> (scores (N,), maps (N, H, W)) float32."""
        return self.backend.infer(frames)

    def _run_canary(self, rtol: float) -> CanaryResult:
        golden = self.manifest.golden
        if not golden:
            return CanaryResult(passed=True, worst_rel_diff=0.0, tolerance=rtol, n_images=0)
        frames = np.stack([self._read_golden(g.file) for g in golden])
        scores, _ = self.infer(frames)
        expected = np.array([g.expected_score for g in golden], np.float64)
        rel = np.abs(scores - expected) / np.maximum(np.abs(expected), 1e-12)
        worst = float(rel.max())
        return CanaryResult(passed=worst <= rtol, worst_rel_diff=worst, tolerance=rtol, n_images=len(golden))

    def _read_golden(self, name: str) -> np.ndarray:
        flag = cv2.IMREAD_GRAYSCALE if self.input_shape[2] == 1 else cv2.IMREAD_COLOR
        image = cv2.imread(str(self.bundle_dir / name), flag)
        if image is None or image.shape[:2] != self.input_shape[:2]:
            msg = f"golden image {name} in {self.bundle_dir} is unreadable or not {self.input_shape[1]}x{self.input_shape[0]}"
            raise BundleError(msg)
        if self.input_shape[2] == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        return image.reshape(self.input_shape)

    def close(self) -> None:
        self.backend.close()
