"""A verified bundle ready to score frames: signature and digests checked, back end open, canary passed."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..bundle import BundleError, Manifest, read_verified, verify_bundle
from ..config import AgentConfig
from ..signing import load_trusted_keys
from .backends import Backend, BackendRequest, Inference, RingRegion, Selection, SlotAddress, SlotBackend, load_backend
from .cuda import CudaError

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
        max_batch: int = 1,
        cuda_graph: bool = False,
        frame_plans: Path | None = None,
    ) -> None:
        self.bundle_dir = bundle_dir
        self.manifest: Manifest = verify_bundle(bundle_dir, trusted_keys, require_signature=require_signature)
        spec = self.manifest.input
        self.input_shape = (spec.height, spec.width, spec.channels)
        self.max_batch = max_batch
        request = BackendRequest(
            bundle_dir,
            self.manifest,
            threads=threads,
            max_batch=max_batch,
            cuda_graph=cuda_graph,
            frame_plans=frame_plans,
        )
        selection = load_backend(backend, request)
        problem = self._check(selection, canary_rtol)
        if problem and backend == "auto" and selection.engine is not None:
            # A native engine that fails here must not serve; ONNX Runtime may.
            log.warning("TensorRT engine %s failed its canary: %s; trying ONNX Runtime", selection.engine.file, problem)
            selection.backend.close()
            selection = load_backend(backend, request, exclude=("tensorrt",))
            problem = self._check(selection, canary_rtol)
        if problem:
            self.backend.close()
            msg = f"canary failed for {self.label}: {problem} on {self.backend.name}; the bundle or this runtime is broken"
            raise BundleError(msg)
        log.info("serving %s on %s; canary %.1e", self.label, self.backend.name, self.canary.worst_rel_diff)

    def _check(self, selection: Selection, canary_rtol: float) -> str:
        """Serve on selection's back end: warm it up, run the canary; "" when it passed, else what failed."""
        self.backend: Backend = selection.backend
        # Decided once: a runtime-checkable Protocol's isinstance probes every member, too slow per batch.
        self._slot_backend = selection.backend if isinstance(selection.backend, SlotBackend) else None
        self.backend_summary = selection.summary
        # A reduced-precision engine passed its own tolerance against ONNX Runtime when it was built.
        rtol = max(canary_rtol, selection.engine.parity.score_rtol) if selection.engine else canary_rtol
        try:
            self.backend.infer(np.zeros((1, *self.input_shape), np.uint8))  # warm-up: first-run allocations
            self.canary = self._run_canary(rtol)
        except CudaError as error:
            self.canary = CanaryResult(passed=False, worst_rel_diff=float("inf"), tolerance=rtol, n_images=0)
            return f"the first inference failed ({error})"
        if not self.canary.passed:
            return f"golden images score {self.canary.worst_rel_diff:.2e} relative off (tolerance {rtol:.0e})"
        return ""

    @property
    def label(self) -> str:
        """`model_id@model_version`, the name every verdict carries."""
        return f"{self.manifest.model_id}@{self.manifest.model_version}"

    @property
    def threshold(self) -> float:
        return self.manifest.threshold.value

    @property
    def score_scale(self) -> float:
        """Twice the distance from the calibration's median good score to the threshold (score_normalisation)."""
        return self.manifest.score_normalisation.scale

    def infer(self, frames: np.ndarray) -> Inference:
        """frames: (N, H, W, C) uint8 at the input size, N <= max_batch -> scores (N,), maps on request."""
        return self.backend.infer(frames)

    def attach_region(self, key: str, region: RingRegion) -> bool:
        """True when the back end reads frames of `region` from their ring slots itself (GPU crop and resize).

        False: prepare them with agent/model_input.py and call infer; also while the back end still builds the
        region's frame engine in the background (it never blocks on a build). Cheap: call it once per camera per batch.
        """
        return self._slot_backend is not None and self._slot_backend.attach_region(key, region)

    def infer_slots(self, frames: Sequence[SlotAddress]) -> Inference:
        """Frames of attached regions, straight from their ring slots -> scores (N,) in order, maps on request."""
        if self._slot_backend is None:
            msg = f"back end {self.backend.name} cannot read ring slots; prepare frames and call infer()"
            raise TypeError(msg)
        return self._slot_backend.infer_slots(frames)

    def _run_canary(self, rtol: float) -> CanaryResult:
        golden = self.manifest.golden
        if not golden:
            return CanaryResult(passed=True, worst_rel_diff=0.0, tolerance=rtol, n_images=0)
        frames = read_golden_images(self.bundle_dir, self.manifest)
        batches = range(0, len(frames), self.max_batch)
        scores = np.concatenate([self.infer(frames[i : i + self.max_batch]).scores for i in batches])
        expected = np.array([g.expected_score for g in golden], np.float64)
        rel = np.abs(scores - expected) / np.maximum(np.abs(expected), 1e-12)
        worst = float(rel.max())
        return CanaryResult(passed=worst <= rtol, worst_rel_diff=worst, tolerance=rtol, n_images=len(golden))

    def close(self) -> None:
        self.backend.close()


def read_golden_images(bundle_dir: Path, manifest: Manifest) -> np.ndarray:
    """(G, H, W, C) uint8: the bundle's golden images as the graph takes them (grey, or RGB)."""
    spec = manifest.input
    shape = (spec.height, spec.width, spec.channels)
    frames = np.empty((len(manifest.golden), *shape), np.uint8)
    flag = cv2.IMREAD_GRAYSCALE if spec.channels == 1 else cv2.IMREAD_COLOR
    for index, golden in enumerate(manifest.golden):
        data = np.frombuffer(read_verified(bundle_dir, manifest, golden.file), np.uint8)
        image = cv2.imdecode(data, flag)
        if image is None or image.shape[:2] != shape[:2]:
            msg = f"golden image {golden.file} in {bundle_dir} is unreadable or not {spec.width}x{spec.height}"
            raise BundleError(msg)
        if spec.channels == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        frames[index] = image.reshape(shape)
    return frames


def load_serving_model(config: AgentConfig, bundle_dir: Path) -> ServingModel:
    """The bundle at bundle_dir as a ServingModel with the engine settings of config (keys, back end, batch)."""
    return ServingModel(
        bundle_dir,
        trusted_keys=load_trusted_keys(config.engine.trusted_keys),
        require_signature=config.engine.require_signature,
        backend=config.engine.backend,
        threads=config.engine.threads,
        canary_rtol=config.engine.canary_rtol,
        max_batch=config.engine.max_batch,
        cuda_graph=config.engine.cuda_graph,
        frame_plans=config.state_dir / "engines" if config.engine.gpu_preprocess else None,
    )
