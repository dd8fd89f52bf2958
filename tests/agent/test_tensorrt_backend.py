"""The TensorRT back end's data path, on a fake CUDA runtime and TensorRT (tests/fake_gpu.py).

These prove the buffers, copies, CUDA-graph replay and error paths of our code; a real engine on
a real GPU runs in tests/trainer/test_tensorrt_build.py where TensorRT and a GPU exist.
"""

import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fake_gpu import FakeCudart, FakeTensorRT, cudaError_t, fake_plan, install

from lineguard.agent.engine.backends import BackendUnavailable
from lineguard.agent.engine.backends.tensorrt import TensorRTBackend, row_runs
from lineguard.agent.engine.cuda import CudaError, check

SHAPE = (256, 256, 1)


@pytest.fixture(scope="module")
def onnx_path(trained_work: Path) -> Path:
    return trained_work / "bundle" / "model.onnx"


@pytest.fixture
def plan(onnx_path: Path, tmp_path: Path) -> Path:
    path = tmp_path / "model.plan"
    path.write_bytes(fake_plan(onnx_path, max_batch=4, input_shape=SHAPE))
    return path


@pytest.fixture
def cudart(monkeypatch) -> FakeCudart:
    fake = FakeCudart()
    install(monkeypatch, fake, FakeTensorRT(fake))
    return fake


def reference(onnx_path: Path, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return tuple(session.run(["score", "anomaly_map"], {"image": frames}))


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8)


def test_check_returns_the_values_and_names_the_call_that_failed():
    assert check((cudaError_t.cudaSuccess,), "cudaFree") is None
    assert check((cudaError_t.cudaSuccess, 42), "cudaMalloc") == 42
    assert check((cudaError_t.cudaSuccess, 1, 2), "call") == (1, 2)
    with pytest.raises(CudaError, match=r"cudaMalloc failed: cudaErrorMemoryAllocation \(2\)"):
        check((cudaError_t.cudaErrorMemoryAllocation, 0), "cudaMalloc")


def test_row_runs_group_consecutive_rows_into_one_copy_each():
    assert row_runs([]) == []
    assert row_runs([0, 1, 2, 5, 6]) == [(0, 0, 3), (5, 3, 2)]
    assert row_runs([3]) == [(3, 0, 1)]
    assert row_runs([2, 1]) == [(2, 0, 1), (1, 1, 1)]


def test_scores_come_back_at_once_and_maps_only_for_the_rows_asked_for(cudart, plan, onnx_path):
    backend = TensorRTBackend(plan, max_batch=4)
    batch = frames(3)
    expected_scores, expected_maps = reference(onnx_path, batch)
    cudart.copies.clear()
    inference = backend.infer(batch)
    np.testing.assert_allclose(inference.scores, expected_scores, rtol=1e-6)
    assert cudart.copies == [("to_device", batch.nbytes), ("to_host", 3 * 4)]  # no map crossed back
    maps = inference.maps([0, 2])
    np.testing.assert_allclose(maps, expected_maps[[0, 2]], rtol=1e-6)
    assert cudart.copies[2:] == [("to_host", 256 * 256 * 4)] * 2
    np.testing.assert_allclose(inference.maps([1, 2]), expected_maps[[1, 2]], rtol=1e-6)
    assert cudart.copies[4:] == [("to_host", 2 * 256 * 256 * 4)]  # consecutive rows: one copy
    backend.close()


def test_maps_of_an_earlier_batch_are_refused_once_the_next_batch_ran(cudart, plan):
    backend = TensorRTBackend(plan, max_batch=4)
    first = backend.infer(frames(2))
    backend.infer(frames(1, seed=1))
    with pytest.raises(RuntimeError, match="earlier batch"):
        first.maps([0])
    backend.close()


def test_batches_that_do_not_fit_are_refused(cudart, plan, tmp_path):
    backend = TensorRTBackend(plan, max_batch=4)
    with pytest.raises(ValueError, match="does not fit"):
        backend.infer(frames(5))
    with pytest.raises(ValueError, match="does not fit"):
        backend.infer(np.zeros((1, 128, 128, 1), np.uint8))
    backend.close()
    with pytest.raises(BackendUnavailable, match="rebuild with --max-batch 8"):
        TensorRTBackend(plan, max_batch=8)
    junk = tmp_path / "junk.plan"
    junk.write_bytes(b"not a plan")
    with pytest.raises(BackendUnavailable, match="cannot load"):
        TensorRTBackend(junk, max_batch=1)


def test_cuda_graphs_replay_new_frames_from_the_staging_buffer(cudart, plan, onnx_path):
    backend = TensorRTBackend(plan, max_batch=4, cuda_graph=True)
    for seed in range(3):
        batch = frames(2, seed=seed)
        np.testing.assert_allclose(backend.infer(batch).scores, reference(onnx_path, batch)[0], rtol=1e-6)
    assert cudart.launches == 3 and cudart.capture_mode == cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    assert "CUDA graphs" in backend.detail
    backend.close()


def test_a_failed_graph_capture_falls_back_to_plain_launches(monkeypatch, plan, onnx_path, caplog):
    cudart = FakeCudart(capture_fails=True)
    install(monkeypatch, cudart, FakeTensorRT(cudart))
    backend = TensorRTBackend(plan, max_batch=4, cuda_graph=True)
    batch = frames(2)
    with caplog.at_level(logging.WARNING):
        scores = backend.infer(batch).scores
    np.testing.assert_allclose(scores, reference(onnx_path, batch)[0], rtol=1e-6)
    assert "running without graphs" in caplog.text and cudart.launches == 0
    backend.close()


def test_close_frees_every_buffer_and_the_stream(cudart, plan):
    backend = TensorRTBackend(plan, max_batch=4)
    backend.infer(frames(1))
    assert cudart.host and cudart.device_memory and cudart.streams == 1
    backend.close()
    assert not cudart.host and not cudart.device_memory and cudart.streams == 0


def test_without_tensorrt_or_cuda_python_the_back_end_says_what_to_install(monkeypatch, plan):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match=r"tensorrt is not installed.*JetPack"):
        TensorRTBackend(plan, max_batch=1)
    cudart = FakeCudart()
    install(monkeypatch, cudart, FakeTensorRT(cudart))
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(__import__("sys").modules, name, None)
    with pytest.raises(BackendUnavailable, match="cuda-python is not installed"):
        TensorRTBackend(plan, max_batch=1)


def test_the_plan_in_a_copied_bundle_is_what_loads(cudart, plan, tmp_path):
    copy = Path(shutil.copy(plan, tmp_path / "copy.plan"))
    backend = TensorRTBackend(copy, max_batch=2)
    assert backend.name == "tensorrt" and "copy.plan" in backend.detail and "TensorRT 10.3.0.26" in backend.detail
    backend.close()
