"""Back-end selection: an explicit name -> loader table, and `auto` in a fixed order of preference."""

from __future__ import annotations

import logging
from pathlib import Path

from .base import Backend, BackendUnavailable
from .onnxrt import OnnxRuntimeBackend

log = logging.getLogger(__name__)

# Native TensorRT engines come with the GPU issue; until then TensorRT runs through ONNX Runtime.
AUTO_ORDER = ("tensorrt", "cuda", "cpu")


def load_backend(choice: str, onnx_path: Path, *, threads: int = 0) -> Backend:
    """Open the chosen back end, or with `auto` the first that works; log what was chosen and why."""
    if choice != "auto":
        return OnnxRuntimeBackend(onnx_path, device=choice, threads=threads)
    skipped = []
    for device in AUTO_ORDER:
        try:
            backend = OnnxRuntimeBackend(onnx_path, device=device, threads=threads)
        except BackendUnavailable as error:
            skipped.append(f"{device}: {error}")
            continue
        log.info(
            "back end %s (%s)%s", backend.name, backend.detail, f"; skipped {'; '.join(skipped)}" if skipped else ""
        )
        return backend
    msg = "no inference back end could start: " + "; ".join(skipped)
    raise BackendUnavailable(msg)


__all__ = ["Backend", "BackendUnavailable", "load_backend"]
