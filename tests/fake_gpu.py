"""Stand-ins for cuda-python and TensorRT, so the code around them runs on machines without a GPU.

The fake CUDA runtime keeps "device" memory in host buffers: copies are real memmoves and
stream capture records them, so a test sees every byte a back end moves and when. The fake
TensorRT runs its "engine" with ONNX Runtime (CPU) on the ONNX graph named in the plan, so the
scores are the real model's. What this proves: our call sequence, buffer sizes, addresses and
error handling. What it cannot: that real TensorRT and CUDA behave as these fakes do.
"""

# ruff: noqa: N801, N802, N815 - the fakes keep the CUDA runtime's and TensorRT's own names

from __future__ import annotations

import ctypes
import sys
import types
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import pytest

PLAN_MAGIC = b"FAKEPLAN\n"


class cudaError_t(IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorNoDevice = 100
    cudaErrorStreamCaptureUnsupported = 900


class cudaMemcpyKind(IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaStreamCaptureMode(IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1


class FakeCudart:
    """The cuda.bindings.runtime calls our code makes; `device` None = a machine without a GPU."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaStreamNonBlocking = 1

    def __init__(self, device: tuple[str, int, int] | None = ("NVIDIA H200", 9, 0), *, capture_fails: bool = False):
        self.device = device
        self.capture_fails = capture_fails
        self.host: dict[int, Any] = {}
        self.device_memory: dict[int, Any] = {}
        self.copies: list[tuple[str, int]] = []  # (direction, bytes) of every executed copy
        self.capturing: list[Any] | None = None
        self.launches = 0
        self.streams = 0

    # memory
    def _allocate(self, table: dict[int, Any], nbytes: int) -> tuple[cudaError_t, int]:
        buffer = ctypes.create_string_buffer(max(nbytes, 1))
        address = ctypes.addressof(buffer)
        table[address] = buffer
        return cudaError_t.cudaSuccess, address

    def cudaMallocHost(self, nbytes: int) -> tuple[cudaError_t, int]:
        return self._allocate(self.host, nbytes)

    def cudaMalloc(self, nbytes: int) -> tuple[cudaError_t, int]:
        return self._allocate(self.device_memory, nbytes)

    def cudaFreeHost(self, address: int) -> tuple[cudaError_t]:
        return (cudaError_t.cudaSuccess,) if self.host.pop(address, None) is not None else (cudaError_t(2),)

    def cudaFree(self, address: int) -> tuple[cudaError_t]:
        return (cudaError_t.cudaSuccess,) if self.device_memory.pop(address, None) is not None else (cudaError_t(2),)

    # streams, copies, graphs
    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[cudaError_t, str]:
        self.streams += 1
        return cudaError_t.cudaSuccess, f"stream-{self.streams}"

    def cudaStreamDestroy(self, stream: str) -> tuple[cudaError_t]:
        self.streams -= 1
        return (cudaError_t.cudaSuccess,)

    def cudaStreamSynchronize(self, stream: str) -> tuple[cudaError_t]:
        return (cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: cudaMemcpyKind, stream: str) -> tuple[cudaError_t]:
        direction = "to_device" if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else "to_host"
        self.enqueue(lambda: (ctypes.memmove(dst, src, nbytes), self.copies.append((direction, nbytes))))
        return (cudaError_t.cudaSuccess,)

    def enqueue(self, work: Any) -> None:
        """Run work now, or record it while a stream capture is open."""
        if self.capturing is not None:
            self.capturing.append(work)
        else:
            work()

    def cudaStreamBeginCapture(self, stream: str, mode: cudaStreamCaptureMode) -> tuple[cudaError_t]:
        self.capture_mode = mode
        self.capturing = []
        return (cudaError_t.cudaSuccess,)

    def cudaStreamEndCapture(self, stream: str) -> tuple[cudaError_t, list[Any] | None]:
        graph, self.capturing = self.capturing, None
        if self.capture_fails:
            return cudaError_t.cudaErrorStreamCaptureUnsupported, None
        return cudaError_t.cudaSuccess, graph

    def cudaGraphInstantiate(self, graph: list[Any], flags: int) -> tuple[cudaError_t, list[Any]]:
        return cudaError_t.cudaSuccess, list(graph)

    def cudaGraphDestroy(self, graph: Any) -> tuple[cudaError_t]:
        return (cudaError_t.cudaSuccess,)

    def cudaGraphExecDestroy(self, graph: Any) -> tuple[cudaError_t]:
        return (cudaError_t.cudaSuccess,)

    def cudaGraphLaunch(self, graph: list[Any], stream: str) -> tuple[cudaError_t]:
        self.launches += 1
        for work in graph:
            work()
        return (cudaError_t.cudaSuccess,)

    # devices
    def cudaGetDeviceCount(self) -> tuple[cudaError_t, int]:
        if self.device is None:
            return cudaError_t.cudaErrorNoDevice, 0
        return cudaError_t.cudaSuccess, 1

    def cudaGetDeviceProperties(self, index: int) -> tuple[cudaError_t, Any]:
        assert self.device is not None
        name, major, minor = self.device
        return cudaError_t.cudaSuccess, types.SimpleNamespace(name=name.encode() + b"\0\0", major=major, minor=minor)


def fake_plan(onnx_path: Path, *, max_batch: int, input_shape: tuple[int, int, int]) -> bytes:
    """Plan bytes the fake runtime loads: which ONNX graph to run and the profile's batch and input."""
    height, width, channels = input_shape
    return PLAN_MAGIC + f"{onnx_path}\n{max_batch} {height} {width} {channels}\n".encode()


class FakeTensorRT(types.ModuleType):
    """The tensorrt module as far as our builder and back end use it (TensorRT 10 names)."""

    def __init__(
        self, cudart: FakeCudart, *, version: str = "10.3.0.26", with_int8: bool = True, score_scale: float = 1.0
    ) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.cudart = cudart
        self.score_scale = score_scale  # != 1: an engine that scores wrong
        self.float32, self.float16, self.uint8, self.int64 = "float32", "float16", "uint8", "int64"
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level=2: None})
        self.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        flags = ["FP16", "TF32", "OBEY_PRECISION_CONSTRAINTS"] + (["INT8"] if with_int8 else [])
        self.BuilderFlag = types.SimpleNamespace(**{flag: flag for flag in flags})
        if with_int8:
            self.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (), {"__init__": lambda s: None})
        self.built: list[FakeBuilder] = []

    def nptype(self, dtype: str) -> type:
        return {"float32": np.float32, "float16": np.float16, "uint8": np.uint8, "int64": np.int64}[dtype]

    def Runtime(self, logger: Any) -> Any:
        return types.SimpleNamespace(deserialize_cuda_engine=lambda plan: FakeEngine.load(self, plan))

    def Builder(self, logger: Any) -> FakeBuilder:
        builder = FakeBuilder(self)
        self.built.append(builder)
        return builder

    def OnnxParser(self, network: FakeNetwork, logger: Any) -> Any:
        def parse_from_file(path: str) -> bool:
            network.onnx_path = Path(path)
            import onnx

            model = onnx.load(path)
            network.layers = [FakeLayer(node.name, self) for node in model.graph.node]
            return True

        return types.SimpleNamespace(parse_from_file=parse_from_file, num_errors=0, get_error=lambda i: "")


class FakeEngine:
    """A 'deserialised plan': runs the named ONNX graph with ONNX Runtime on the fake device memory."""

    def __init__(self, trt: FakeTensorRT, onnx_path: Path, max_batch: int, input_shape: tuple[int, int, int]):
        import onnxruntime as ort

        self.trt, self.max_batch, self.input_shape = trt, max_batch, input_shape
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.names = ["image", "score", "anomaly_map"]
        self.num_io_tensors = 3

    @classmethod
    def load(cls, trt: FakeTensorRT, plan: bytes) -> FakeEngine | None:
        if not plan.startswith(PLAN_MAGIC):
            return None
        path, numbers = plan[len(PLAN_MAGIC) :].decode().splitlines()
        max_batch, height, width, channels = (int(n) for n in numbers.split())
        return cls(trt, Path(path), max_batch, (height, width, channels))

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_dtype(self, name: str) -> str:
        return "uint8" if name == "image" else "float32"

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name == "image" else "output"

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        return [(1, *self.input_shape), (self.max_batch, *self.input_shape), (self.max_batch, *self.input_shape)]

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.batch = 0
        self.executions = 0

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if tuple(shape[1:]) != self.engine.input_shape or not 1 <= shape[0] <= self.engine.max_batch:
            return False
        self.batch = shape[0]
        return True

    def execute_async_v3(self, stream: str) -> bool:
        n = self.batch
        self.engine.trt.cudart.enqueue(lambda: self._run(n))
        return True

    def _run(self, n: int) -> None:
        self.executions += 1
        height, width, channels = self.engine.input_shape
        frames = _device_array(self.addresses["image"], (n, height, width, channels), np.uint8)
        scores, maps = self.engine.session.run(["score", "anomaly_map"], {"image": frames.copy()})
        _device_array(self.addresses["score"], (n,), np.float32)[...] = scores * self.engine.trt.score_scale
        _device_array(self.addresses["anomaly_map"], (n, height, width), np.float32)[...] = maps


def _device_array(address: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_ubyte * nbytes).from_address(address), dtype=dtype).reshape(shape)


class FakeLayer:
    def __init__(self, name: str, trt: FakeTensorRT) -> None:
        self.name = name
        shape_op = name.split("/")[-1].startswith(("Shape", "Gather", "Concat", "Slice"))
        self.outputs = [types.SimpleNamespace(dtype=trt.int64 if shape_op else trt.float32)]
        self.num_outputs = 1
        self.precision = None
        self.output_types: dict[int, str] = {}

    def get_output(self, index: int) -> Any:
        return self.outputs[index]

    def set_output_type(self, index: int, dtype: str) -> None:
        self.output_types[index] = dtype


class FakeNetwork:
    def __init__(self) -> None:
        self.onnx_path: Path | None = None
        self.layers: list[FakeLayer] = []

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, index: int) -> FakeLayer:
        return self.layers[index]


class FakeConfig:
    def __init__(self) -> None:
        self.flags = {"TF32"}  # on by default, as in TensorRT
        self.pool: dict[str, int] = {}
        self.profiles: list[Any] = []
        self.timing_cache_in: bytes | None = None
        self.int8_calibrator: Any = None
        self.calibration_profile: Any = None

    def set_memory_pool_limit(self, pool: str, nbytes: int) -> None:
        self.pool[pool] = nbytes

    def create_timing_cache(self, data: bytes) -> bytes:
        self.timing_cache_in = data
        return data

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
        return True

    def get_timing_cache(self) -> Any:
        return types.SimpleNamespace(serialize=lambda: (self.timing_cache_in or b"") + b"+tuned")

    def add_optimization_profile(self, profile: Any) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_calibration_profile(self, profile: Any) -> bool:
        self.calibration_profile = profile
        return True

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.flags.discard(flag)


class FakeBuilder:
    def __init__(self, trt: FakeTensorRT) -> None:
        self.trt = trt
        self.network = FakeNetwork()
        self.config = FakeConfig()
        self.calibration_batches: list[int] = []

    def create_network(self, flags: int) -> FakeNetwork:
        assert flags == 0, "TensorRT 10: explicit batch is the default, flags 0"
        return self.network

    def create_builder_config(self) -> FakeConfig:
        return self.config

    def create_optimization_profile(self) -> Any:
        shapes: dict[str, tuple] = {}
        return types.SimpleNamespace(
            set_shape=lambda name, low, opt, high: shapes.update({name: (low, opt, high)}), shapes=shapes
        )

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes | None:
        calibrator = config.int8_calibrator
        if calibrator is not None:  # TensorRT pulls batches until the calibrator says there are no more
            size = calibrator.get_batch_size()
            while (pointers := calibrator.get_batch(["image"])) is not None:
                self.calibration_batches.append(size)
                assert len(pointers) == 1 and pointers[0] in self.trt.cudart.device_memory
            calibrator.write_calibration_cache(b"table")
        high = config.profiles[0].shapes["image"][2]
        assert network.onnx_path is not None
        return fake_plan(network.onnx_path, max_batch=high[0], input_shape=tuple(high[1:]))


def install(monkeypatch: pytest.MonkeyPatch, cudart: FakeCudart, trt: FakeTensorRT | None = None) -> None:
    """Make `import tensorrt` and `from cuda.bindings import runtime` find the fakes (for this test only)."""
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart  # type: ignore[attr-defined]
    cuda.bindings = bindings  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    if trt is not None:
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
