"""Stand-ins for cuda-python and TensorRT, so the code around them runs on machines without a GPU.

The fake CUDA runtime keeps "device" memory in host buffers: copies are real memmoves and
stream capture records them, so a test sees every byte a back end moves and when; 2-D copies
refuse pageable host memory (CUDA's documented contract), so a test sees what was page-locked.
The fake TensorRT runs its "engine" with ONNX Runtime (CPU) on the ONNX graph named in or carried
by the plan (the model's, or a frame graph the fake builder parsed), so the outputs are real. What this proves: our call sequence, buffer sizes, addresses and
error handling. What it cannot: that real TensorRT and CUDA behave as these fakes do.
"""

# ruff: noqa: N801, N802, N815 - the fakes keep the CUDA runtime's and TensorRT's own names

from __future__ import annotations

import ctypes
import json
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
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorNoDevice = 100
    cudaErrorHostMemoryAlreadyRegistered = 712
    cudaErrorHostMemoryNotRegistered = 713
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
        self.registered: dict[int, int] = {}  # cudaHostRegister: address -> bytes
        self.register_fails = False  # True: cudaHostRegister refuses, as for memory the driver cannot pin
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

    def cudaHostRegister(self, address: int, nbytes: int, flags: int) -> tuple[cudaError_t]:
        if self.register_fails:
            return (cudaError_t.cudaErrorInvalidValue,)
        if any(address < start + size and start < address + nbytes for start, size in self.registered.items()):
            return (cudaError_t.cudaErrorHostMemoryAlreadyRegistered,)
        self.registered[address] = nbytes
        return (cudaError_t.cudaSuccess,)

    def cudaHostUnregister(self, address: int) -> tuple[cudaError_t]:
        if self.registered.pop(address, None) is None:
            return (cudaError_t.cudaErrorHostMemoryNotRegistered,)
        return (cudaError_t.cudaSuccess,)

    def _page_locked(self, address: int, nbytes: int) -> bool:
        pinned = [(start, size) for start, size in self.registered.items()]
        pinned += [(start, len(buffer)) for start, buffer in self.host.items()]
        return any(start <= address and address + nbytes <= start + size for start, size in pinned)

    def _on_device(self, address: int, nbytes: int) -> bool:
        return any(
            start <= address and address + nbytes <= start + len(buffer) for start, buffer in self.device_memory.items()
        )

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

    def cudaMemcpy2DAsync(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: cudaMemcpyKind, stream: str
    ) -> tuple[cudaError_t]:
        """Host to device only; like CUDA's documented contract, it refuses pageable source memory."""
        source_span = (height - 1) * spitch + width
        valid = (
            kind == cudaMemcpyKind.cudaMemcpyHostToDevice
            and width <= min(spitch, dpitch)
            and self._page_locked(src, source_span)
            and self._on_device(dst, (height - 1) * dpitch + width)
        )
        if not valid:
            return (cudaError_t.cudaErrorInvalidValue,)

        def copy() -> None:
            for row in range(height):
                ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
            self.copies.append(("to_device_2d", width * height))

        self.enqueue(copy)
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
    return _plan(str(onnx_path), {"image": (max_batch, *input_shape)})


def _plan(onnx: str | bytes, largest: dict[str, tuple[int, ...]]) -> bytes:
    """A fake plan: a JSON line (profile's largest shape per input, ONNX path) and, for an in-memory graph, its bytes."""
    header = {"onnx": onnx if isinstance(onnx, str) else None, "largest": largest}
    return PLAN_MAGIC + json.dumps(header).encode() + b"\n" + (onnx if isinstance(onnx, bytes) else b"")


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
        self.plans_built = 0

    def nptype(self, dtype: str) -> type:
        return {"float32": np.float32, "float16": np.float16, "uint8": np.uint8, "int64": np.int64}[dtype]

    def Runtime(self, logger: Any) -> Any:
        return types.SimpleNamespace(deserialize_cuda_engine=lambda plan: FakeEngine.load(self, plan))

    def Builder(self, logger: Any) -> FakeBuilder:
        builder = FakeBuilder(self)
        self.built.append(builder)
        return builder

    def OnnxParser(self, network: FakeNetwork, logger: Any) -> Any:
        import onnx

        def parse_from_file(path: str) -> bool:
            network.onnx = str(path)
            network.layers = [FakeLayer(node.name, self) for node in onnx.load(path).graph.node]
            return True

        def parse(model: bytes) -> bool:
            network.onnx = bytes(model)
            network.layers = [FakeLayer(node.name, self) for node in onnx.load_from_string(model).graph.node]
            return True

        return types.SimpleNamespace(parse_from_file=parse_from_file, parse=parse, num_errors=0, get_error=lambda i: "")


class FakeEngine:
    """A 'deserialised plan': runs its ONNX graph with ONNX Runtime on the fake device memory."""

    def __init__(self, trt: FakeTensorRT, onnx: str | bytes, largest: dict[str, tuple[int, ...]]):
        import onnxruntime as ort

        self.trt, self.largest = trt, largest
        self.session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: _dtype(i.type) for i in self.session.get_inputs()}
        self.outputs = {o.name: _dtype(o.type) for o in self.session.get_outputs()}
        self.names = [*self.inputs, *self.outputs]
        self.num_io_tensors = len(self.names)

    @classmethod
    def load(cls, trt: FakeTensorRT, plan: bytes) -> FakeEngine | None:
        if not plan.startswith(PLAN_MAGIC):
            return None
        header, _, graph = plan[len(PLAN_MAGIC) :].partition(b"\n")
        fields = json.loads(header)
        largest = {name: tuple(shape) for name, shape in fields["largest"].items()}
        return cls(trt, fields["onnx"] or graph, largest)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_dtype(self, name: str) -> str:
        return {**self.inputs, **self.outputs}[name]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name in self.inputs else "output"

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        largest = self.largest[name]
        return [(1, *largest[1:]), largest, largest]

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self)


def _dtype(onnx_type: str) -> str:
    return {"tensor(uint8)": "uint8", "tensor(float)": "float32"}[onnx_type]


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.executions = 0

    @property
    def batch(self) -> int:
        return next(iter(self.shapes.values()))[0]

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        largest = self.engine.largest[name]
        if tuple(shape[1:]) != largest[1:] or not 1 <= shape[0] <= largest[0]:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def execute_async_v3(self, stream: str) -> bool:
        shapes = dict(self.shapes)
        addresses = dict(self.addresses)  # TensorRT reads the addresses when the work is queued
        self.engine.trt.cudart.enqueue(lambda: self._run(shapes, addresses))
        return True

    def _run(self, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int]) -> None:
        self.executions += 1
        engine = self.engine
        feed = {
            name: _device_array(addresses[name], shapes[name], engine.trt.nptype(dtype)).copy()
            for name, dtype in engine.inputs.items()
        }
        results = engine.session.run(list(engine.outputs), feed)
        for name, result in zip(engine.outputs, results, strict=True):
            if name == "score":
                result = result * engine.trt.score_scale
            _device_array(addresses[name], result.shape, result.dtype)[...] = result


def _device_array(address: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
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
        self.onnx: str | bytes | None = None  # the parsed file's path, or the graph parsed from memory
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
        assert network.onnx is not None
        self.trt.plans_built += 1
        return _plan(network.onnx, {name: tuple(high) for name, (_, _, high) in config.profiles[0].shapes.items()})


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
