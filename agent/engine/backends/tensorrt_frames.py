"""The TensorRT back end's GPU frame path: ROI rows straight from a page-locked ring slot, then a small engine.

Per camera: the ring's whole mapping is page-locked once (cudaHostRegister), a device buffer holds up
to max_batch ROI crops, and a TensorRT engine built from engine/frame_graph.py turns them into model input
(channel order or grey, INTER_AREA resampling) written straight into the model engine's input buffer. The
frame plan is built on first use with the TensorRT builder (FP32: TF32 would move pixels by a grey level) and
cached under `<state_dir>/engines/`, keyed by the graph, TensorRT version, GPU and batch size.

A build can take a minute, so it runs on a background thread (`FramePlanBuild`), one at a time, at the lowest
CPU priority, while the camera's frames take the CPU path. That thread only makes plan bytes: it touches no
CUDA object of the back end. Loading the plan, page-locking and the buffers (`FrameEngine`) happen on the
scoring thread, which owns the back end's stream. The builder times its kernels on the GPU on streams of its
own: a build may slow a few batches, never fail them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ...model_input import PixelFormat
from ..background import lower_thread_priority
from ..cuda import CudaError, HostRegistration, Stream
from ..frame_graph import IMAGE_NAME, ROI_NAME, frame_graph
from .base import RingRegion
from .tensorrt_network import OnnxParseError, parse_onnx, profile_shapes

log = logging.getLogger(__name__)

# One frame-plan build at a time in the process: builds compete for GPU memory, and two cameras with the same
# ROI would build the same plan twice and race on its cache file (the second one now finds it cached).
_ONE_BUILD_AT_A_TIME = threading.Lock()


class FrameEngineError(Exception):
    """A region's frame engine cannot be built or loaded; its frames take the CPU path."""


@dataclass(frozen=True, slots=True)
class FramePlanCache:
    """Where frame plans are kept, and the GPU they are built for (a plan runs only where it was built)."""

    folder: Path
    gpu_name: str

    def path(self, graph: bytes, tensorrt_version: str, max_batch: int) -> Path:
        key = hashlib.sha256(graph + f"\0{tensorrt_version}\0{self.gpu_name}\0{max_batch}".encode()).hexdigest()
        return self.folder / f"frame-{key[:32]}.plan"


def build_frame_plan(trt: ModuleType, graph: bytes, roi_shape: tuple[int, int, int], max_batch: int) -> bytes:
    """Serialised FP32 engine of a frame graph with one profile, batch 1..max_batch of (h_roi, w_roi, C) frames."""
    try:
        parsed = parse_onnx(trt, graph, name="the frame graph")
    except OnnxParseError as error:
        raise FrameEngineError(str(error)) from error
    builder = parsed.builder
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # 10-bit mantissas: area sums of 0..255 would round differently
    profile = builder.create_optimization_profile()
    profile.set_shape(ROI_NAME, *profile_shapes(roi_shape, max_batch))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(parsed.network, config)
    if plan is None:
        msg = f"TensorRT {trt.__version__} could not build the frame engine for {roi_shape} ROIs (its log says why)"
        raise FrameEngineError(msg)
    return bytes(plan)


def frame_plan(
    trt: ModuleType, cache: FramePlanCache, graph: bytes, roi_shape: tuple[int, int, int], max_batch: int
) -> bytes:
    """The cached plan for this graph, else a new one, saved for the next start (a build can take a minute)."""
    path = cache.path(graph, str(trt.__version__), max_batch)
    if path.is_file():
        cached = _read_cached(path)
        if cached is not None:
            return cached
    log.info(
        "building the GPU frame engine for %s ROIs in the background (first start with this camera and model)",
        roi_shape,
    )
    plan = build_frame_plan(trt, graph, roi_shape, max_batch)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(plan)
        partial.chmod(0o600)
        path.with_name(path.name + ".sha256").write_text(hashlib.sha256(plan).hexdigest())
        partial.replace(path)
        log.info("frame engine cached in %s", path)
    except OSError as error:
        log.warning("cannot cache the frame engine in %s (%s); it is rebuilt at the next start", path, error)
    return plan


def _read_cached(path: Path) -> bytes | None:
    """A cached plan, if it is ours and whole: owned by this user, writable by no one else, its sha256 matching.

    TensorRT deserialises plans without checking them, so a plan anyone else could have written is rebuilt."""
    try:
        info = path.stat()
        folder = path.parent.stat()
        digest = path.with_name(path.name + ".sha256").read_text().strip()
        plan = path.read_bytes()
    except OSError as error:
        log.warning("frame plan cache %s unreadable (%s); rebuilding", path, error)
        return None
    foreign = {info.st_uid, folder.st_uid} != {os.getuid()} or (info.st_mode | folder.st_mode) & 0o022
    if foreign or hashlib.sha256(plan).hexdigest() != digest:
        why = "writable by others or not ours" if foreign else "its sha256 does not match"
        log.warning("frame plan cache %s is %s; rebuilding it", path, why)
        return None
    return plan


class FrameEngine:
    """One region's frame path on the back end's stream: page-locked ring, device ROI buffer, frame engine."""

    def __init__(
        self, trt: ModuleType, runtime: Any, stream: Stream, region: RingRegion, *, plan: bytes, max_batch: int
    ) -> None:
        self.region, self.max_batch, self._stream = region, max_batch, stream
        _, frame_w, channels = _frame_shape(region)
        x, y, width, height = region.box
        self._roi_shape = (height, width, channels)
        self._row_bytes, self._rows, self._pitch = width * channels, height, frame_w * channels
        self._offset = (y * frame_w + x) * channels
        self._crop_bytes = width * height * channels
        self._engine = runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            msg = f"TensorRT {trt.__version__} cannot load the frame plan (a damaged cache file? delete <state_dir>/engines/frame-*.plan)"
            raise FrameEngineError(msg)
        self._context = self._engine.create_execution_context()
        if self._context is None:
            msg = "TensorRT could not create an execution context for the frame engine (out of GPU memory?)"
            raise FrameEngineError(msg)
        self._roi = stream.device(max_batch * self._crop_bytes)
        try:
            self._pinned = HostRegistration(stream.cudart, region.ring.segment())
        except CudaError:
            stream.free(self._roi)
            raise
        if not self._context.set_tensor_address(ROI_NAME, self._roi):
            self.close()
            msg = f"TensorRT refused the address of the frame engine's {ROI_NAME!r}"
            raise FrameEngineError(msg)
        self._shape_n = 0

    def copy(self, slot_address: int, row: int) -> None:
        """Queue the DMA of one frame's ROI (only its rows and columns) into ROI row `row`."""
        self._stream.to_device_2d(
            self._roi + row * self._crop_bytes,
            slot_address + self._offset,
            row_bytes=self._row_bytes,
            rows=self._rows,
            host_pitch=self._pitch,
        )

    def run(self, n: int, image_address: int) -> None:
        """Queue the conversion of ROI rows 0..n-1 into n model-input frames at image_address (device)."""
        if n != self._shape_n:
            if not self._context.set_input_shape(ROI_NAME, (n, *self._roi_shape)):
                msg = f"the frame engine refused batch {n} (profile up to {self.max_batch})"
                raise ValueError(msg)
            self._shape_n = n
        if not self._context.set_tensor_address(IMAGE_NAME, image_address):
            msg = f"TensorRT refused the address of the frame engine's {IMAGE_NAME!r}"
            raise CudaError(msg)
        if not self._context.execute_async_v3(self._stream.handle):
            msg = f"TensorRT execute_async_v3 failed for the frame engine, batch of {n}"
            raise CudaError(msg)

    def close(self) -> None:
        """Wait for queued copies, then release the ROI buffer, the page-locking and the engine."""
        for release in (self._stream.synchronize, lambda: self._stream.free(self._roi), self._pinned.close):
            try:
                release()
            except CudaError as error:
                log.error("releasing a frame engine: %s", error)
        del self._context
        del self._engine


class FramePlanBuild:
    """One region's frame plan, read from the cache or built on a background thread; poll `done()`, then `plan()`.

    The thread is a daemon and holds nothing of the back end, so a back end that closes meanwhile just
    drops it: the build finishes on its own and still caches its plan for the next start.
    """

    def __init__(
        self,
        trt: ModuleType,
        region: RingRegion,
        *,
        cache: FramePlanCache,
        max_batch: int,
        input_shape: tuple[int, int, int],
    ) -> None:
        self.inputs = plan_inputs(region)
        self._plan: bytes | None = None
        self._error = ""
        self._thread = threading.Thread(
            target=self._run, args=(trt, cache, max_batch, input_shape), name="frame-plan-build", daemon=True
        )
        self._thread.start()

    def _run(self, trt: ModuleType, cache: FramePlanCache, max_batch: int, input_shape: tuple[int, int, int]) -> None:
        lower_thread_priority("a frame engine build")
        # CUDA's current device is per thread: the back end never sets one, so both threads use device 0.
        (height, width, channels), source_format = self.inputs
        try:
            with _ONE_BUILD_AT_A_TIME:
                graph = frame_graph((height, width), channels, source_format, input_shape)
                self._plan = frame_plan(trt, cache, graph, (height, width, channels), max_batch)
        except ImportError as error:
            self._error = f"onnx is not installed ({error}): pip install 'lineguard[tensorrt]' (or [jetson])"
        except Exception as error:  # noqa: BLE001 - the top of this thread: any failure leaves the camera on the CPU path
            self._error = str(error) or type(error).__name__

    def done(self) -> bool:
        """True once the plan is ready or its build has failed."""
        return not self._thread.is_alive()

    def wait(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for the build; True when it is done."""
        self._thread.join(timeout_s)
        return self.done()

    def plan(self) -> bytes:
        """The serialised frame engine of a done build; FrameEngineError saying why the build failed."""
        if not self.done():
            msg = "the frame plan is still being built"
            raise FrameEngineError(msg)
        if self._plan is None:
            raise FrameEngineError(self._error)
        return self._plan


def plan_inputs(region: RingRegion) -> tuple[tuple[int, int, int], PixelFormat]:
    """What a region's frame plan depends on: the (h_roi, w_roi, C) of its ROI and its pixel format."""
    _, _, width, height = region.box
    return (height, width, _frame_shape(region)[2]), region.source_format


def _frame_shape(region: RingRegion) -> tuple[int, int, int]:
    shape = region.ring.slot_shape
    if len(shape) != 3:
        msg = f"ring {region.ring.name!r} holds {shape} slots, not (H, W, C) frames"
        raise FrameEngineError(msg)
    return int(shape[0]), int(shape[1]), int(shape[2])
