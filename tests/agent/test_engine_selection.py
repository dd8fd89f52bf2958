"""Which back end serves: the bundle's engine for this GPU and TensorRT version, else ONNX Runtime, and why."""

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_tools import engine_info
from fake_gpu import FakeCudart, FakeTensorRT, cudaError_t, install

from lineguard.agent.bundle import BundleError, verify_bundle
from lineguard.agent.engine import gpu as gpu_module
from lineguard.agent.engine.backends import BackendRequest, BackendUnavailable, load_backend
from lineguard.agent.engine.gpu import GpuInfo, detect_gpu, gpu_slug, parse_nvidia_smi, select_engine
from lineguard.agent.engine.model import ServingModel
from lineguard.agent.signing import load_public_key, public_key_path

H200 = GpuInfo("NVIDIA H200", "9.0")


def test_the_fastest_engine_built_for_this_gpu_and_tensorrt_version_is_chosen():
    engines = [engine_info("fp32"), engine_info("int8"), engine_info("fp16")]
    choice = select_engine(engines, H200, "10.3.0.30", max_batch=8)  # the build number may differ
    assert choice.engine is not None and choice.engine.precision == "int8"
    assert "matches NVIDIA H200 (sm90), TensorRT 10.3.0.30" in choice.reason


@pytest.mark.parametrize(
    ("candidate", "gpu", "version", "max_batch", "reason"),
    [
        (engine_info(cc="8.6", gpu="NVIDIA A10"), H200, "10.3.0", 1, "compute capability 8.6, this GPU is 9.0"),
        (
            engine_info(gpu="NVIDIA H100 80GB HBM3"),
            H200,
            "10.3.0",
            1,
            "built on NVIDIA H100 80GB HBM3, this GPU is NVIDIA H200",
        ),
        (engine_info(), H200, "10.4.0.1", 1, "built with TensorRT 10.3.0.26, this agent has 10.4.0.1"),
        (engine_info(max_batch=4), H200, "10.3.0", 8, "stops at batch 4, engine.max_batch is 8"),
        (engine_info(), None, None, 1, "no CUDA GPU found"),
        (engine_info(), H200, None, 1, "tensorrt is not installed"),
    ],
)
def test_an_engine_for_another_target_is_skipped_with_the_reason(candidate, gpu, version, max_batch, reason):
    choice = select_engine([candidate], gpu, version, max_batch=max_batch)
    assert choice.engine is None and reason in choice.reason


def test_a_bundle_without_engines_says_how_to_build_one():
    assert "lineguard-train build-engine" in select_engine([], H200, "10.3.0", max_batch=1).reason


def test_nvidia_smi_output_is_parsed_and_gpu_names_become_file_names():
    devices = parse_nvidia_smi("NVIDIA H200, 9.0\nNVIDIA GeForce RTX 4090, 8.9\n\n")
    assert devices == [GpuInfo("NVIDIA H200", "9.0", 0), GpuInfo("NVIDIA GeForce RTX 4090", "8.9", 1)]
    assert devices[1].sm == "sm89" and gpu_slug(devices[1].name) == "nvidia-geforce-rtx-4090"
    with pytest.raises(ValueError, match="unexpected nvidia-smi line"):
        parse_nvidia_smi("No devices were found\n")


def test_the_gpu_is_found_through_the_cuda_runtime_and_none_without_one(monkeypatch):
    install(monkeypatch, FakeCudart(("NVIDIA H200", 9, 0)))
    assert detect_gpu() == H200
    install(monkeypatch, FakeCudart(None))
    monkeypatch.setattr(gpu_module.shutil, "which", lambda name: None)
    assert detect_gpu() is None
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)  # no cuda-python at all
    assert detect_gpu() is None


def trusted(signing_key: Path):
    return [load_public_key(public_key_path(signing_key))]


def test_auto_serves_the_matching_engine_and_says_why(bundle_with_engine, signing_key, monkeypatch):
    cudart = FakeCudart()
    install(monkeypatch, cudart, FakeTensorRT(cudart))
    model = ServingModel(bundle_with_engine, trusted_keys=trusted(signing_key), max_batch=4)
    assert model.backend.name == "tensorrt" and model.canary.passed and model.canary.n_images == 8
    assert model.canary.tolerance == 1e-2  # the fp16 engine's own parity tolerance, not the fp32 1e-3
    assert "engines/nvidia-h200-sm90-trt10.3.0-fp16.plan matches NVIDIA H200 (sm90)" in model.backend_summary
    inference = model.infer(np.zeros((2, 256, 256, 1), np.uint8))
    assert inference.scores.shape == (2,) and inference.maps([1]).shape == (1, 256, 256)
    model.close()


def test_without_a_gpu_auto_falls_back_to_onnx_runtime_and_names_the_reason(
    bundle_with_engine, signing_key, monkeypatch
):
    install(monkeypatch, FakeCudart(None))
    monkeypatch.setattr(gpu_module.shutil, "which", lambda name: None)
    model = ServingModel(bundle_with_engine, trusted_keys=trusted(signing_key))
    assert model.backend.name == "onnxruntime-cpu"
    assert "skipped tensorrt: no CUDA GPU found" in model.backend_summary
    model.close()


def test_an_engine_that_fails_its_canary_gives_way_to_onnx_runtime(
    bundle_with_engine, signing_key, monkeypatch, caplog
):
    cudart = FakeCudart()
    install(monkeypatch, cudart, FakeTensorRT(cudart, score_scale=1.5))
    with caplog.at_level(logging.WARNING):
        model = ServingModel(bundle_with_engine, trusted_keys=trusted(signing_key), max_batch=4)
    assert model.backend.name == "onnxruntime-cpu" and model.canary.passed
    assert "failed its canary" in caplog.text and "tensorrt: excluded" in model.backend_summary
    model.close()


def test_an_engine_whose_first_run_fails_on_the_gpu_gives_way_too(bundle_with_engine, signing_key, monkeypatch):
    cudart = FakeCudart()
    install(monkeypatch, cudart, FakeTensorRT(cudart))
    monkeypatch.setattr(cudart, "cudaStreamSynchronize", lambda stream: (cudaError_t.cudaErrorMemoryAllocation,))
    model = ServingModel(bundle_with_engine, trusted_keys=trusted(signing_key), max_batch=4)
    assert model.backend.name == "onnxruntime-cpu" and model.canary.passed
    with pytest.raises(
        BundleError, match=r"canary failed for brick-test@1.0.0: the first inference failed \(cudaStreamSynchronize"
    ):
        ServingModel(bundle_with_engine, trusted_keys=trusted(signing_key), max_batch=4, backend="tensorrt")


def test_asking_for_tensorrt_without_a_matching_engine_is_an_error(trained_work, signing_key, monkeypatch):
    install(monkeypatch, FakeCudart())
    manifest = verify_bundle(trained_work / "bundle", trusted(signing_key))
    with pytest.raises(BackendUnavailable, match="the bundle has no TensorRT engine"):
        load_backend("tensorrt", BackendRequest(trained_work / "bundle", manifest))
    with pytest.raises(BackendUnavailable, match="unknown back end"):
        load_backend("openvino", BackendRequest(trained_work / "bundle", manifest))


def test_a_tensorrt_model_with_a_frame_plan_folder_reads_ring_slots_and_onnx_runtime_does_not(
    bundle_with_engine, signing_key, monkeypatch, tmp_path
):
    from lineguard.agent.engine.backends import RingRegion, SlotAddress
    from lineguard.agent.ring import ShmRing

    cudart = FakeCudart()
    install(monkeypatch, cudart, FakeTensorRT(cudart))
    ring = ShmRing.create(f"lg-test-{id(tmp_path)}", slot_count=2, slot_shape=(300, 300, 1), dtype=np.uint8)
    try:
        region = RingRegion(ring, (0, 0, 300, 300), "mono8")
        model = ServingModel(
            bundle_with_engine, trusted_keys=trusted(signing_key), max_batch=4, frame_plans=tmp_path / "engines"
        )
        assert not model.attach_region("cam0", region)  # its frame engine is being built in the background
        assert model.backend.wait_for_frame_plans(timeout_s=60)
        assert model.attach_region("cam0", region) and "GPU crop and resize" in model.backend.detail
        assert model.infer_slots([SlotAddress("cam0", ring.address(1))]).scores.shape == (1,)
        model.close()
        assert not cudart.registered
        cpu = ServingModel(bundle_with_engine, trusted_keys=trusted(signing_key), backend="cpu")
        assert not cpu.attach_region("cam0", region)
        with pytest.raises(TypeError, match="cannot read ring slots"):
            cpu.infer_slots([SlotAddress("cam0", ring.address(1))])
        cpu.close()
    finally:
        ring.close()


def test_onnx_runtime_sessions_keep_their_idle_threads_asleep(trained_work, signing_key):
    # A second session (another model, a shadow, a swap's incoming model) spinning idle took the
    # cores from the running one: bench/ort_threads_bench.py. The agent's sessions must not spin.
    model = ServingModel(trained_work / "bundle", trusted_keys=trusted(signing_key), backend="cpu")
    options = model.backend._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    model.close()
