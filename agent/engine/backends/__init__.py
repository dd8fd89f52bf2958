"""Back-end selection: an explicit name -> loader table, and `auto` in a fixed order of preference.

`auto` takes the bundle's TensorRT engine built for this GPU and TensorRT version, else ONNX
Runtime on CUDA, else ONNX Runtime on the CPU, and says in one line what it chose and why the
others were skipped (a WARNING when a GPU is present but the CPU serves).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from ...bundle import EngineInfo, Manifest, read_verified
from ..gpu import GpuInfo, detect_gpu, select_engine
from .base import Backend, BackendUnavailable, Inference, RingRegion, SlotAddress, SlotBackend
from .onnxrt import OnnxRuntimeBackend

log = logging.getLogger(__name__)

AUTO_ORDER = ("tensorrt", "cuda", "cpu")


@dataclass(frozen=True, slots=True)
class BackendRequest:
    """What a back end is opened for: a verified bundle and the engine settings."""

    bundle_dir: Path
    manifest: Manifest
    threads: int = 0
    max_batch: int = 1
    cuda_graph: bool = False
    frame_plans: Path | None = None  # TensorRT: crop and resize on the GPU, frame plans cached here; None = on the CPU


@dataclass(frozen=True, slots=True)
class Selection:
    """The opened back end, the native engine it runs (None for ONNX Runtime) and the one-line why."""

    backend: Backend
    engine: EngineInfo | None
    summary: str


def load_backend(choice: str, request: BackendRequest, *, exclude: Collection[str] = ()) -> Selection:
    """Open the chosen back end, or with `auto` the first in AUTO_ORDER that works (less `exclude`)."""
    if choice != "auto" and choice not in AUTO_ORDER:
        msg = f"unknown back end {choice!r}; choose auto or one of {', '.join(AUTO_ORDER)}"
        raise BackendUnavailable(msg)
    order = [name for name in (AUTO_ORDER if choice == "auto" else (choice,)) if name not in exclude]
    gpu = detect_gpu() if "tensorrt" in order else None
    skipped = [f"{name}: excluded" for name in exclude if choice == "auto"]
    for name in order:
        try:
            backend, engine, why = _LOADERS[name](request, gpu)
        except BackendUnavailable as error:
            skipped.append(f"{name}: {error}")
            continue
        summary = f"back end {backend.name} ({backend.detail}){why}" + (
            f"; skipped {'; '.join(skipped)}" if skipped else ""
        )
        degraded = gpu is not None and name == "cpu"
        log.log(logging.WARNING if degraded else logging.INFO, "%s", summary)
        return Selection(backend, engine, summary)
    msg = "no inference back end could start: " + "; ".join(skipped)
    raise BackendUnavailable(msg)


def _native(request: BackendRequest, gpu: GpuInfo | None) -> tuple[Backend, EngineInfo | None, str]:
    from .tensorrt import TensorRTBackend, tensorrt_version
    from .tensorrt_frames import FramePlanCache

    engines = request.manifest.engines
    version = tensorrt_version() if engines and gpu is not None else None
    choice = select_engine(engines, gpu, version, max_batch=request.max_batch)
    if choice.engine is None:
        raise BackendUnavailable(choice.reason)
    assert gpu is not None  # select_engine chose an engine for it
    frame_plans = FramePlanCache(request.frame_plans, gpu.name) if request.frame_plans is not None else None
    backend = TensorRTBackend(
        request.bundle_dir / choice.engine.file,
        plan=read_verified(request.bundle_dir, request.manifest, choice.engine.file),
        max_batch=request.max_batch,
        cuda_graph=request.cuda_graph,
        frame_plans=frame_plans,
    )
    spec = request.manifest.input
    if backend.input_shape != (spec.height, spec.width, spec.channels):
        backend.close()
        msg = f"{choice.engine.file} takes {backend.input_shape} frames, the bundle's model {spec.height, spec.width, spec.channels}: rebuild it"
        raise BackendUnavailable(msg)
    return backend, choice.engine, f": {choice.reason}"


def _onnxruntime(device: str) -> Callable[[BackendRequest, GpuInfo | None], tuple[Backend, EngineInfo | None, str]]:
    def load(request: BackendRequest, gpu: GpuInfo | None) -> tuple[Backend, EngineInfo | None, str]:
        model = read_verified(request.bundle_dir, request.manifest, request.manifest.model.onnx_file)
        return OnnxRuntimeBackend(model, device=device, threads=request.threads), None, ""

    return load


_LOADERS: dict[str, Callable[[BackendRequest, GpuInfo | None], tuple[Backend, EngineInfo | None, str]]] = {
    "tensorrt": _native,
    "cuda": _onnxruntime("cuda"),
    "cpu": _onnxruntime("cpu"),
}


__all__ = [
    "Backend",
    "BackendRequest",
    "BackendUnavailable",
    "Inference",
    "RingRegion",
    "Selection",
    "SlotAddress",
    "SlotBackend",
    "load_backend",
]
