"""ONNX Runtime back end: CUDA or CPU execution provider.

onnxruntime-gpu lists GPU providers even where CUDA libraries are missing and then silently
runs on the CPU, so the session's actual providers are checked after creation: a back end
that did not get its device refuses to start instead of pretending. Native TensorRT engines
run in backends/tensorrt.py, not through ONNX Runtime's TensorRT provider (which would build
an engine at every start).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import BackendUnavailable, Inference

log = logging.getLogger(__name__)

# Each session owns a pool of intra-op threads that by default spin for a while after every run.
# The engine runs one inference at a time, but a second session (another model, a shadow or a
# swap's incoming model) spinning idle takes the cores from the one running: two sessions
# alternating took about twice as long per frame, and the spin also takes CPU from capture and
# decision. Sleeping idle threads cost no measurable latency here (bench/ort_threads_bench.py).
SESSION_CONFIG = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}

PROVIDERS = {
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class OnnxRuntimeBackend:
    """An ONNX Runtime session on one device kind."""

    def __init__(self, model: bytes | Path, *, device: str, threads: int = 0) -> None:
        """model: the verified bytes of the ONNX graph (or a path, for tools that read their own files)."""
        if device not in PROVIDERS:
            msg = f"unknown ONNX Runtime device {device!r}; choose one of {', '.join(PROVIDERS)}"
            raise BackendUnavailable(msg)
        try:
            import onnxruntime as ort
        except ImportError as error:
            msg = "onnxruntime is not installed: pip install 'lineguard[cpu]' (or [gpu] on a CUDA machine)"
            raise BackendUnavailable(msg) from error
        wanted = PROVIDERS[device]
        if wanted not in ort.get_available_providers():
            msg = f"ONNX Runtime here has no {wanted} (available: {', '.join(ort.get_available_providers())})"
            raise BackendUnavailable(msg)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        for key, value in SESSION_CONFIG.items():
            options.add_session_config_entry(key, value)
        providers = [wanted] if device == "cpu" else [wanted, PROVIDERS["cpu"]]
        source = model if isinstance(model, bytes) else str(model)
        self._session = ort.InferenceSession(source, options, providers=providers)
        actual = self._session.get_providers()
        if actual[0] != wanted:
            msg = (
                f"ONNX Runtime could not start {wanted} (it fell back to {', '.join(actual)}); check the CUDA libraries"
            )
            raise BackendUnavailable(msg)
        self.name = f"onnxruntime-{device}"
        self.detail = ",".join(actual)
        self._input_name = self._session.get_inputs()[0].name

    def infer(self, frames: np.ndarray) -> Inference:
        scores, maps = self._session.run(["score", "anomaly_map"], {self._input_name: frames})

        def fetch_maps(rows: Sequence[int]) -> np.ndarray:
            return maps[list(rows)]

        return Inference(scores, fetch_maps)

    def close(self) -> None:
        del self._session
