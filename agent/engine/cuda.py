"""The few CUDA runtime calls the TensorRT back end needs, through cuda-python, checked.

Why cuda-python rather than pycuda: cuda-python (`cuda-bindings`) ships binary wheels for
x86_64 and aarch64 (Jetson) per CUDA major version and imports without a driver, failing
cleanly at the first call, so the agent installs and its tests run on machines without a GPU;
pycuda is source-only and needs `cuda.h` and a compiler on every install. cuda-python also
exposes CUDA graphs (`cudaStreamBeginCapture` .. `cudaGraphLaunch`), which the back end uses.

Every call returns `(error, *values)`; `check` turns a non-zero error into CudaError naming the
call, and returns the values. Buffers are freed by their owner's `close`, never by the GC.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message names the call and the CUDA error."""


def runtime() -> ModuleType:
    """The cuda-python runtime module: `cuda.bindings.runtime` (cuda-python 12.6+), else `cuda.cudart`.

    Raises ImportError when cuda-python is not installed.
    """
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # cuda-python before 12.6, e.g. what JetPack 6 machines often have
    return cudart


def check(result: Any, call: str) -> Any:
    """Unpack a cuda-python result `(error, *values)`: CudaError unless error is 0.

    Returns None for no value, the value for one, a tuple for more.
    """
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        name = getattr(error, "name", str(error))
        msg = f"{call} failed: {name} ({int(error)})"
        raise CudaError(msg)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def host_array(address: int, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A numpy view of `shape` and `dtype` on host memory at `address` (owned elsewhere)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = memoryview((ctypes.c_ubyte * nbytes).from_address(address)).cast("B")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


class Stream:
    """One non-blocking CUDA stream and the page-locked and device buffers used on it."""

    def __init__(self, cudart: ModuleType) -> None:
        self.cudart = cudart
        self.handle = check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self._host: list[int] = []
        self._device: list[int] = []

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """A page-locked host array (cudaMallocHost): copies from it are true asynchronous DMA."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        address = int(check(self.cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
        self._host.append(address)
        return host_array(address, shape, dtype)

    def device(self, nbytes: int) -> int:
        """nbytes of device memory (cudaMalloc); returns its address."""
        address = int(check(self.cudart.cudaMalloc(nbytes), "cudaMalloc"))
        self._device.append(address)
        return address

    def to_device(self, device_address: int, host: np.ndarray) -> None:
        """Queue a copy of `host` (contiguous) to device_address."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        result = self.cudart.cudaMemcpyAsync(device_address, host.ctypes.data, host.nbytes, kind, self.handle)
        check(result, "cudaMemcpyAsync(host to device)")

    def to_device_2d(
        self, device_address: int, host_address: int, *, row_bytes: int, rows: int, host_pitch: int
    ) -> None:
        """Queue a copy of `rows` rows of `row_bytes`, `host_pitch` bytes apart on the host, to contiguous device memory.

        This is how a ROI leaves a full frame: only its rows and columns cross PCIe. The host memory
        must be page-locked (`HostRegistration`) for the copy to be asynchronous DMA.
        """
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        result = self.cudart.cudaMemcpy2DAsync(
            device_address, row_bytes, host_address, host_pitch, row_bytes, rows, kind, self.handle
        )
        check(result, "cudaMemcpy2DAsync(host to device)")

    def to_host(self, host: np.ndarray, device_address: int) -> None:
        """Queue a copy of host.nbytes from device_address into `host` (contiguous)."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        result = self.cudart.cudaMemcpyAsync(host.ctypes.data, device_address, host.nbytes, kind, self.handle)
        check(result, "cudaMemcpyAsync(device to host)")

    def free(self, device_address: int) -> None:
        """Free one buffer from `device` before close (a frame source that went away)."""
        self._device.remove(device_address)
        check(self.cudart.cudaFree(device_address), "cudaFree")

    def synchronize(self) -> None:
        check(self.cudart.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def capture(self, record: Callable[[], None]) -> CudaGraph:
        """Record what `record` queues on this stream into an instantiated CUDA graph.

        Thread-local capture mode: the engine loads a candidate model on another thread while
        this one serves, and a global-mode capture would forbid that thread's CUDA calls.
        """
        mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(self.cudart.cudaStreamBeginCapture(self.handle, mode), "cudaStreamBeginCapture")
        try:
            record()
        finally:
            graph = check(self.cudart.cudaStreamEndCapture(self.handle), "cudaStreamEndCapture")
        try:
            executable = check(self.cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            check(self.cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
        return CudaGraph(self, executable)

    def close(self) -> None:
        """Wait for queued work, then free every buffer and the stream; errors are logged, not raised."""
        cudart = self.cudart
        calls: list[tuple[str, Callable[..., Any], Any]] = [
            ("cudaStreamSynchronize", cudart.cudaStreamSynchronize, self.handle),
            *(("cudaFreeHost", cudart.cudaFreeHost, address) for address in self._host),
            *(("cudaFree", cudart.cudaFree, address) for address in self._device),
            ("cudaStreamDestroy", cudart.cudaStreamDestroy, self.handle),
        ]
        self._host, self._device = [], []
        for name, call, argument in calls:
            try:
                check(call(argument), name)
            except CudaError as error:
                log.error("releasing CUDA resources: %s", error)


class CudaGraph:
    """An instantiated CUDA graph, replayed on its stream."""

    def __init__(self, stream: Stream, executable: Any) -> None:
        self.stream, self.executable = stream, executable

    def launch(self) -> None:
        check(self.stream.cudart.cudaGraphLaunch(self.executable, self.stream.handle), "cudaGraphLaunch")

    def close(self) -> None:
        check(self.stream.cudart.cudaGraphExecDestroy(self.executable), "cudaGraphExecDestroy")


class HostRegistration:
    """Existing host memory page-locked in place (cudaHostRegister), e.g. a whole shared-memory ring mapping.

    DMA can then read a frame straight from its ring slot, with no staging copy. Holds `memory`
    until `close`: unmapping registered memory would leave the driver pinning pages nobody owns.
    """

    def __init__(self, cudart: ModuleType, memory: np.ndarray) -> None:
        if not memory.flags.c_contiguous or memory.nbytes == 0:
            msg = "only a non-empty contiguous host array can be page-locked"
            raise ValueError(msg)
        self.cudart = cudart
        self.address, self.nbytes = int(memory.ctypes.data), int(memory.nbytes)
        flags = 0  # cudaHostRegisterDefault; ReadOnly would need a device attribute check first
        check(cudart.cudaHostRegister(self.address, self.nbytes, flags), "cudaHostRegister")
        self._memory: np.ndarray | None = memory

    def close(self) -> None:
        """Unregister (idempotent); the caller has synchronised every stream that copies from it."""
        if self._memory is None:
            return
        try:
            check(self.cudart.cudaHostUnregister(self.address), "cudaHostUnregister")
        finally:
            self._memory = None
