"""The TensorRT back end's data path, on a fake CUDA runtime and TensorRT (tests/fake_gpu.py).

These prove the buffers, copies, CUDA-graph replay and error paths of our code; a real engine on
a real GPU runs in tests/trainer/test_tensorrt_build.py where TensorRT and a GPU exist.
"""

import logging
import os
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from fake_gpu import FakeBuilder, FakeCudart, FakeTensorRT, cudaError_t, fake_plan, install
from skimage import data

from lineguard.agent.config import RoiConfig
from lineguard.agent.engine.backends import BackendUnavailable, RingRegion, SlotAddress
from lineguard.agent.engine.backends.tensorrt import TensorRTBackend, row_runs
from lineguard.agent.engine.backends.tensorrt_frames import FramePlanCache
from lineguard.agent.engine.cuda import CudaError, check
from lineguard.agent.model_input import Preprocessor
from lineguard.agent.ring import ShmRing

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


# The GPU frame path: ROI rows straight from page-locked ring slots, converted and resized by a frame engine.

MONO_BOX = (120, 40, 400, 400)  # x, y, width, height in a 640x480 mono8 frame: 400 -> 256, a 1.5625 factor
COLOUR_BOX = (40, 0, 300, 300)  # in a 400x300 bgr8 frame, into the grey model: a 1.17 factor


def camera_frames(n: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """(n, H, W, C) uint8: shifted crops of a real photograph, grey or RGB."""
    height, width, channels = shape
    photo = data.astronaut() if channels == 3 else data.brick()[..., None]
    crops = [photo[10 * i + seed : 10 * i + seed + height, 5 * i : 5 * i + width] for i in range(n)]
    return np.stack([cv2.resize(c, (width, height)).reshape(shape) if c.shape != shape else c for c in crops])


@pytest.fixture
def make_ring():
    made: list[ShmRing] = []

    def make(label: str, frames: np.ndarray) -> ShmRing:
        name = f"lg-test-{os.getpid()}-{label}"
        ring = ShmRing.create(name, slot_count=len(frames), slot_shape=frames.shape[1:], dtype=np.uint8)
        for slot, frame in enumerate(frames):
            ring.array(slot)[...] = frame
        made.append(ring)
        return ring

    yield make
    for ring in made:
        ring.close()


def on_the_cpu(onnx_path: Path, frames: np.ndarray, box, source_format: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores and maps of the frames prepared by OpenCV (the path the GPU one replaces)."""
    x, y, width, height = box
    prep = Preprocessor(RoiConfig(x=x, y=y, width=width, height=height), frames.shape[1:], SHAPE, source_format)
    return reference(onnx_path, np.stack([prep(frame, np.empty(SHAPE, np.uint8)) for frame in frames]))


def gpu_backend(plan: Path, cache: Path) -> TensorRTBackend:
    return TensorRTBackend(plan, max_batch=4, frame_plans=FramePlanCache(cache, "NVIDIA H200"))


def attach(backend: TensorRTBackend, key: str, region: RingRegion) -> bool:
    """attach_region once its frame plan is ready: the first call starts building it and says False."""
    assert not backend.attach_region(key, region)
    assert backend.wait_for_frame_plans(timeout_s=60)
    return backend.attach_region(key, region)


def test_frames_go_from_the_ring_slot_to_the_gpu_roi_only_and_score_as_on_the_cpu(
    cudart, plan, onnx_path, make_ring, tmp_path
):
    frames = camera_frames(3, (480, 640, 1), seed=0)
    ring = make_ring("mono", frames)
    backend = gpu_backend(plan, tmp_path / "engines")
    assert attach(backend, "cam0", RingRegion(ring, MONO_BOX, "mono8"))
    cudart.copies.clear()
    inference = backend.infer_slots([SlotAddress("cam0", ring.address(slot)) for slot in range(3)])
    # Only the 400 ROI rows of 400 bytes each crossed, not the 640x480 frame; no staging copy; scores back.
    assert cudart.copies == [("to_device_2d", 400 * 400)] * 3 + [("to_host", 3 * 4)]
    expected_scores, expected_maps = on_the_cpu(onnx_path, frames, MONO_BOX, "mono8")
    np.testing.assert_allclose(inference.scores, expected_scores, rtol=1e-3)
    np.testing.assert_allclose(inference.maps([2]), expected_maps[[2]], rtol=1e-3, atol=1e-3 * expected_maps.max())
    backend.close()


def test_a_batch_mixing_cameras_maps_back_to_its_own_order(cudart, plan, onnx_path, make_ring, tmp_path):
    mono, colour = camera_frames(2, (480, 640, 1), seed=3), camera_frames(2, (300, 400, 3), seed=7)
    mono_ring, colour_ring = make_ring("mono", mono), make_ring("colour", colour)
    backend = gpu_backend(plan, tmp_path / "engines")
    assert attach(backend, "cam0", RingRegion(mono_ring, MONO_BOX, "mono8"))
    assert attach(backend, "cam1", RingRegion(colour_ring, COLOUR_BOX, "bgr8"))
    batch = [
        SlotAddress("cam1", colour_ring.address(0)),
        SlotAddress("cam0", mono_ring.address(1)),
        SlotAddress("cam1", colour_ring.address(1)),
        SlotAddress("cam0", mono_ring.address(0)),
    ]
    inference = backend.infer_slots(batch)
    mono_scores, mono_maps = on_the_cpu(onnx_path, mono, MONO_BOX, "mono8")
    colour_scores, colour_maps = on_the_cpu(onnx_path, colour, COLOUR_BOX, "bgr8")
    expected = [colour_scores[0], mono_scores[1], colour_scores[1], mono_scores[0]]
    np.testing.assert_allclose(inference.scores, expected, rtol=1e-3)
    maps = inference.maps([1, 2])
    np.testing.assert_allclose(maps[0], mono_maps[1], rtol=1e-3, atol=1e-3 * mono_maps.max())
    np.testing.assert_allclose(maps[1], colour_maps[1], rtol=1e-3, atol=1e-3 * colour_maps.max())
    with pytest.raises(ValueError, match="attached regions"):
        backend.infer_slots([SlotAddress("cam9", mono_ring.address(0))])
    backend.close()


def test_a_frame_engine_that_cannot_be_built_leaves_its_camera_on_the_cpu_path_with_one_warning(
    cudart, plan, make_ring, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(FakeBuilder, "build_serialized_network", lambda self, network, config: None)
    ring = make_ring("mono", camera_frames(1, (480, 640, 1), seed=0))
    backend = gpu_backend(plan, tmp_path / "engines")
    region = RingRegion(ring, MONO_BOX, "mono8")
    with caplog.at_level(logging.WARNING):
        assert not attach(backend, "cam0", region)
        assert not backend.attach_region("cam0", region)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not build the frame engine" in warnings[0].getMessage()
    assert "prepared on the CPU" in warnings[0].getMessage() and not cudart.registered
    backend.infer(frames(1))  # the CPU-prepared path still serves
    backend.close()


def test_without_a_plan_cache_or_when_page_locking_fails_frames_take_the_cpu_path(
    cudart, plan, make_ring, tmp_path, caplog
):
    ring = make_ring("mono", camera_frames(1, (480, 640, 1), seed=0))
    plain = TensorRTBackend(plan, max_batch=4)
    assert not plain.attach_region("cam0", RingRegion(ring, MONO_BOX, "mono8"))
    plain.close()
    cudart.register_fails = True
    backend = gpu_backend(plan, tmp_path / "engines")
    with caplog.at_level(logging.WARNING):
        assert not attach(backend, "cam0", RingRegion(ring, MONO_BOX, "mono8"))
    assert "cudaHostRegister failed" in caplog.text
    backend.close()
    assert not cudart.device_memory and not cudart.host


def test_the_ring_is_page_locked_while_attached_and_released_on_reattach_and_close(cudart, plan, make_ring, tmp_path):
    frames_ = camera_frames(2, (480, 640, 1), seed=0)
    first, second = make_ring("first", frames_), make_ring("second", frames_)
    backend = gpu_backend(plan, tmp_path / "engines")
    assert attach(backend, "cam0", RingRegion(first, MONO_BOX, "mono8"))
    assert cudart.registered == {first.segment().ctypes.data: first.segment().nbytes}
    assert backend.attach_region("cam0", RingRegion(first, MONO_BOX, "mono8"))  # known: nothing new
    assert attach(backend, "cam0", RingRegion(second, MONO_BOX, "mono8"))  # capture restarted: the plan is cached
    assert list(cudart.registered) == [second.segment().ctypes.data]
    backend.close()
    assert not cudart.registered and not cudart.device_memory and not cudart.host and cudart.streams == 0


def test_the_frame_plan_is_built_once_and_reused_from_the_cache_on_the_next_start(
    monkeypatch, plan, make_ring, tmp_path
):
    ring = make_ring("mono", camera_frames(1, (480, 640, 1), seed=0))
    cache = tmp_path / "engines"
    for start in range(2):
        cudart = FakeCudart()
        trt = FakeTensorRT(cudart)
        install(monkeypatch, cudart, trt)
        backend = gpu_backend(plan, cache)
        assert attach(backend, "cam0", RingRegion(ring, MONO_BOX, "mono8"))
        backend.infer_slots([SlotAddress("cam0", ring.address(0))])
        backend.close()
        assert trt.plans_built == (1 if start == 0 else 0)
    (plan_file,) = [p for p in cache.iterdir() if p.suffix == ".plan"]
    assert plan_file.name.startswith("frame-") and plan_file.with_name(plan_file.name + ".sha256").is_file()
    assert plan_file.stat().st_mode & 0o077 == 0 and cache.stat().st_mode & 0o077 == 0  # no one else's to change


def test_a_cached_frame_plan_that_was_changed_is_rebuilt_not_loaded(monkeypatch, plan, make_ring, tmp_path, caplog):
    ring = make_ring("mono", camera_frames(1, (480, 640, 1), seed=0))
    cache = tmp_path / "engines"
    for _start in range(2):
        cudart = FakeCudart()
        trt = FakeTensorRT(cudart)
        install(monkeypatch, cudart, trt)
        backend = gpu_backend(plan, cache)
        assert attach(backend, "cam0", RingRegion(ring, MONO_BOX, "mono8"))
        backend.infer_slots([SlotAddress("cam0", ring.address(0))])
        backend.close()
        assert trt.plans_built == 1  # the second start rebuilds: the cached plan was altered
        (plan_file,) = [p for p in cache.iterdir() if p.suffix == ".plan"]
        plan_file.write_bytes(plan_file.read_bytes() + b"tampered")
    assert "its sha256 does not match" in caplog.text


def test_attach_region_never_waits_for_a_build_which_runs_niced_off_the_scoring_thread(
    cudart, plan, make_ring, tmp_path, held_builds
):
    ring = make_ring("mono", camera_frames(1, (480, 640, 1), seed=0))
    backend = gpu_backend(plan, tmp_path / "engines")
    region = RingRegion(ring, MONO_BOX, "mono8")
    assert not backend.attach_region("cam0", region)  # returns at once: the build waits for held_builds.release
    assert held_builds.started.wait(30)
    (builder,) = [t for t in threading.enumerate() if t.name == "frame-plan-build"]
    assert builder is not threading.current_thread() and os.getpriority(os.PRIO_PROCESS, builder.native_id) == 19
    assert not backend.attach_region("cam0", region) and not backend.wait_for_frame_plans(timeout_s=0)
    assert not cudart.registered  # nothing of the frame path exists until the plan is ready
    backend.infer(frames(1))  # the CPU-prepared path serves meanwhile
    held_builds.release.set()
    assert backend.wait_for_frame_plans(timeout_s=60)
    assert backend.attach_region("cam0", region) and cudart.registered
    backend.close()


def test_closing_while_a_frame_plan_builds_drops_the_build_which_still_caches_its_plan(
    cudart, plan, make_ring, tmp_path, held_builds
):
    ring = make_ring("mono", camera_frames(1, (480, 640, 1), seed=0))
    backend = gpu_backend(plan, tmp_path / "engines")
    assert not backend.attach_region("cam0", RingRegion(ring, MONO_BOX, "mono8"))
    assert held_builds.started.wait(30)
    backend.close()  # does not wait for the build
    assert not cudart.registered and not cudart.device_memory and not cudart.host and cudart.streams == 0
    held_builds.release.set()
    for thread in [t for t in threading.enumerate() if t.name == "frame-plan-build"]:
        thread.join(60)
    assert sorted(p.suffix for p in (tmp_path / "engines").iterdir()) == [".plan", ".sha256"]  # the next start loads it
