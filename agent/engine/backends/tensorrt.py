"""Native TensorRT back end: a plan from the bundle on one CUDA stream (TensorRT 10 name-based API).

Two ways in, both ending in `execute_async_v3` and an asynchronous copy of the N scores back on
the engine's own stream, then one synchronise:
- `infer_slots` (the GPU frame path, when a frame plan cache is given): each frame's ROI rows
  go by DMA straight from its page-locked ring slot to the device, and a small per-camera
  engine (engine/frame_graph.py) converts and resizes them into the model's input buffer
  (backends/tensorrt_frames.py). No CPU pixel work, no staging copy. A camera's frame engine
  is built on a background thread the first time its frames arrive; until it is ready (a
  TensorRT build can take a minute) its frames take the CPU path below, so none is late.
- `infer`: model-size frames the CPU prepared (agent/model_input.py) are copied into a
  page-locked staging buffer and sent in one copy. The canary, a shadow-tested candidate and
  any camera whose frame engine is being built or cannot be built use this path.
The model part may be replayed as one CUDA graph per batch size. Anomaly maps stay on the device
until `Inference.maps(rows)` copies back the rows the decision needs (rejects, sampled heatmaps).
Normalisation runs inside the model engine (uint8 in). CUDA calls go through cuda-python
(engine/cuda.py says why not pycuda).
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from ..cuda import CudaError, CudaGraph, Stream, runtime
from .base import BackendUnavailable, Inference, RingRegion, SlotAddress
from .tensorrt_frames import FrameEngine, FrameEngineError, FramePlanBuild, FramePlanCache, plan_inputs

log = logging.getLogger(__name__)

INPUT_NAME = "image"
SCORE_NAME = "score"
MAP_NAME = "anomaly_map"


def import_tensorrt() -> ModuleType:
    """The tensorrt module, or BackendUnavailable saying how to get it."""
    try:
        import tensorrt
    except ImportError as error:
        msg = (
            "tensorrt is not installed: pip install 'lineguard[tensorrt]' on x86_64; on a Jetson it comes with JetPack"
        )
        raise BackendUnavailable(msg) from error
    return tensorrt


def row_runs(rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """Group batch rows into runs of consecutive rows: [(first row, position in rows, count)].

    rows [0, 1, 2, 5, 6] -> [(0, 0, 3), (5, 3, 2)]: one copy per run instead of one per row.
    """
    runs: list[tuple[int, int, int]] = []
    for position, row in enumerate(rows):
        if runs and runs[-1][0] + runs[-1][2] == row and runs[-1][1] + runs[-1][2] == position:
            first, at, count = runs[-1]
            runs[-1] = (first, at, count + 1)
        else:
            runs.append((row, position, 1))
    return runs


class TensorRTBackend:
    """A deserialised TensorRT plan with its execution context, stream and buffers for max_batch frames."""

    def __init__(
        self,
        plan_path: Path,
        *,
        max_batch: int,
        plan: bytes | None = None,
        cuda_graph: bool = False,
        frame_plans: FramePlanCache | None = None,
    ) -> None:
        """plan: the verified bytes of plan_path (read here when None, for tools and tests)."""
        trt = import_tensorrt()
        try:
            cudart = runtime()
        except ImportError as error:
            msg = "cuda-python is not installed: pip install 'lineguard[tensorrt]' (cuda-python matching the CUDA major version)"
            raise BackendUnavailable(msg) from error
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime, which keeps a pointer to it
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan if plan is not None else plan_path.read_bytes())
        if self._engine is None:
            msg = f"TensorRT {trt.__version__} cannot load {plan_path}: built for another TensorRT version or GPU? rebuild it with `lineguard-train build-engine`"
            raise BackendUnavailable(msg)
        self.input_shape = self._check_tensors(plan_path, max_batch)
        self.max_batch = max_batch
        self._context = self._engine.create_execution_context()
        if self._context is None:
            msg = f"TensorRT could not create an execution context for {plan_path.name} (out of GPU memory?)"
            raise BackendUnavailable(msg)
        try:
            self._stream = Stream(cudart)
        except CudaError as error:
            msg = f"CUDA could not create a stream for {plan_path.name}: {error}"
            raise BackendUnavailable(msg) from error
        try:
            self._allocate()
        except CudaError as error:
            self._stream.close()
            msg = f"CUDA could not allocate the buffers of {plan_path.name}: {error}"
            raise BackendUnavailable(msg) from error
        self._graphs: dict[tuple[int, bool], CudaGraph] = {}  # (batch size, staged)
        self._use_graphs = cuda_graph
        self._frame_plans = frame_plans
        self._engines: dict[str, FrameEngine] = {}
        self._builds: dict[str, FramePlanBuild] = {}  # frame plans being built, by region key
        self._refused: dict[str, RingRegion] = {}  # regions whose frame engine failed: CPU path, warned once
        self._shape_n = 0
        self._generation = 0  # counts batches, so maps of an earlier batch are never mistaken for this one's
        self.name = "tensorrt"
        self.detail = (
            f"{plan_path.name}, TensorRT {trt.__version__}"
            + (", CUDA graphs" if cuda_graph else "")
            + (", GPU crop and resize" if frame_plans else "")
        )

    def _check_tensors(self, plan_path: Path, max_batch: int) -> tuple[int, int, int]:
        """The engine's (H, W, C) input; BackendUnavailable unless its tensors are the bundle contract's."""
        trt, engine = self._trt, self._engine
        tensors = {engine.get_tensor_name(i): i for i in range(engine.num_io_tensors)}
        expected = {INPUT_NAME: np.uint8, SCORE_NAME: np.float32, MAP_NAME: np.float32}
        for name, dtype in expected.items():
            if name not in tensors or np.dtype(trt.nptype(engine.get_tensor_dtype(name))) != np.dtype(dtype):
                msg = (
                    f"{plan_path} lacks tensor {name!r} of {np.dtype(dtype)} (it has {', '.join(tensors)}); rebuild it"
                )
                raise BackendUnavailable(msg)
        if engine.get_tensor_mode(INPUT_NAME) != trt.TensorIOMode.INPUT:
            msg = f"{plan_path}: {INPUT_NAME!r} is not an input; rebuild it"
            raise BackendUnavailable(msg)
        _, _, largest = engine.get_tensor_profile_shape(INPUT_NAME, 0)
        if largest[0] < max_batch:
            msg = f"{plan_path} takes at most {largest[0]} frames per batch, engine.max_batch is {max_batch}: rebuild with --max-batch {max_batch}"
            raise BackendUnavailable(msg)
        height, width, channels = (int(d) for d in tuple(largest)[1:])
        return height, width, channels

    def _allocate(self) -> None:
        """Page-locked host and device buffers for max_batch frames; tensor addresses are set once."""
        n, (height, width, channels) = self.max_batch, self.input_shape
        stream = self._stream
        self._host_frames = stream.pinned((n, height, width, channels), np.uint8)
        self._host_scores = stream.pinned((n,), np.float32)
        self._host_maps = stream.pinned((n, height, width), np.float32)
        self._map_bytes = height * width * 4
        self._frame_bytes = height * width * channels
        self._device = {
            INPUT_NAME: stream.device(self._host_frames.nbytes),
            SCORE_NAME: stream.device(self._host_scores.nbytes),
            MAP_NAME: stream.device(self._host_maps.nbytes),
        }
        for name, address in self._device.items():
            if not self._context.set_tensor_address(name, address):
                msg = f"TensorRT refused the address of tensor {name!r}"
                raise CudaError(msg)

    def infer(self, frames: np.ndarray) -> Inference:
        """frames: (N, H, W, C) uint8, N <= max_batch -> scores now, maps on request."""
        n = len(frames)
        if not 1 <= n <= self.max_batch or frames.shape[1:] != self.input_shape:
            msg = f"batch {frames.shape} does not fit this engine: up to {self.max_batch} x {self.input_shape}"
            raise ValueError(msg)
        np.copyto(self._host_frames[:n], frames)
        generation = self._execute(n, staged=True)

        def fetch_maps(rows: Sequence[int]) -> np.ndarray:
            return self._fetch_maps(rows, n=n, generation=generation)

        return Inference(self._host_scores[:n].copy(), fetch_maps)

    def attach_region(self, key: str, region: RingRegion) -> bool:
        """True when frames of `region` can go through infer_slots; False (infer with CPU-prepared frames) else.

        The first call per region starts building (or loading from the cache) its frame plan on a
        background thread and returns False, as do calls while it builds. The first call after the
        build opens the frame engine here on the scoring thread (it page-locks the ring and allocates
        on the back end's stream). A region whose frame engine fails is reported once and stays on
        the CPU path until its ring changes.
        """
        if self._frame_plans is None:
            return False
        engine = self._engines.get(key)
        if engine is not None and engine.region == region:
            return True
        if self._refused.get(key) == region:
            return False
        if engine is not None:  # its ring was re-attached (capture restarted) or its ROI changed
            engine.close()
            del self._engines[key]
        try:
            build = self._builds.get(key)
            if build is None or build.inputs != plan_inputs(region):  # new, or its ROI size or format changed
                self._builds[key] = FramePlanBuild(
                    self._trt, region, cache=self._frame_plans, max_batch=self.max_batch, input_shape=self.input_shape
                )
                return False
            if not build.done():
                return False
            del self._builds[key]
            self._engines[key] = FrameEngine(
                self._trt, self._runtime, self._stream, region, plan=build.plan(), max_batch=self.max_batch
            )
        except (FrameEngineError, RuntimeError, OSError) as error:  # RuntimeError: CudaError and TensorRT's own
            log.warning("%s: no GPU crop and resize (%s); its frames are prepared on the CPU", key, error)
            self._refused[key] = region
            return False
        self._refused.pop(key, None)
        log.info("%s: frames go from the ring slot to the GPU (ROI %s, %s)", key, region.box, region.source_format)
        return True

    def wait_for_frame_plans(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for the frame plans being built; True when none is still building."""
        deadline_s = time.monotonic() + timeout_s
        return all(build.wait(max(0.0, deadline_s - time.monotonic())) for build in list(self._builds.values()))

    def infer_slots(self, frames: Sequence[SlotAddress]) -> Inference:
        """N <= max_batch frames of attached regions, any mix and order -> scores in that order, maps on request.

        Frames are grouped by region so each frame engine converts one contiguous run of the model's
        input; `position` maps each frame back to its row in the engine's batch.
        """
        n = len(frames)
        if not 1 <= n <= self.max_batch or any(frame.key not in self._engines for frame in frames):
            msg = f"{n} slot frames from {sorted({f.key for f in frames})}: up to {self.max_batch} of attached regions {sorted(self._engines)}"
            raise ValueError(msg)
        order = sorted(range(n), key=lambda i: frames[i].key)  # stable: arrival order within a region
        position = np.empty(n, np.intp)
        position[order] = np.arange(n)
        first = 0
        for key, group in itertools.groupby(order, key=lambda i: frames[i].key):
            members = list(group)
            engine = self._engines[key]
            for row, index in enumerate(members):
                engine.copy(frames[index].address, row)
            engine.run(len(members), self._device[INPUT_NAME] + first * self._frame_bytes)
            first += len(members)
        generation = self._execute(n, staged=False)

        def fetch_maps(rows: Sequence[int]) -> np.ndarray:
            return self._fetch_maps([int(position[row]) for row in rows], n=n, generation=generation)

        return Inference(self._host_scores[position], fetch_maps)

    def _execute(self, n: int, *, staged: bool) -> int:
        """Run the model on n frames (first from the staging buffer when staged), scores back; the batch's generation."""
        self._set_batch(n)
        record = functools.partial(self._enqueue, n, staged=staged)
        graph = self._graph((n, staged), record) if self._use_graphs else None
        if graph is not None:
            graph.launch()
        else:
            record()
        self._stream.synchronize()
        self._generation += 1
        return self._generation

    def _set_batch(self, n: int) -> None:
        if n != self._shape_n:
            if not self._context.set_input_shape(INPUT_NAME, (n, *self.input_shape)):
                msg = f"TensorRT refused batch {n} (profile up to {self.max_batch})"
                raise ValueError(msg)
            self._shape_n = n

    def _enqueue(self, n: int, *, staged: bool) -> None:
        """Queue (when staged) the copy in, inference, copy of the scores out on the engine's stream."""
        if staged:
            self._stream.to_device(self._device[INPUT_NAME], self._host_frames[:n])
        if not self._context.execute_async_v3(self._stream.handle):
            msg = f"TensorRT execute_async_v3 failed for a batch of {n}"
            raise CudaError(msg)
        self._stream.to_host(self._host_scores[:n], self._device[SCORE_NAME])

    def _graph(self, key: tuple[int, bool], record: Callable[[], None]) -> CudaGraph | None:
        """The CUDA graph of `record` for (batch, staged), captured on first use; None (graphs off) when capture fails."""
        graph = self._graphs.get(key)
        if graph is None:
            record()  # TensorRT applies deferred shape changes on the first enqueue: never inside a capture
            self._stream.synchronize()
            try:
                graph = self._graphs[key] = self._stream.capture(record)
            except CudaError as error:
                log.warning("CUDA graph capture failed for batch %d (%s); running without graphs", key[0], error)
                self._use_graphs = False
                return None
        return graph

    def _fetch_maps(self, rows: Sequence[int], *, n: int, generation: int) -> np.ndarray:
        if generation != self._generation:
            msg = "anomaly maps of an earlier batch were requested after the next batch ran"
            raise RuntimeError(msg)
        if any(not 0 <= row < n for row in rows):
            msg = f"rows {list(rows)} outside the batch of {n}"
            raise IndexError(msg)
        device_maps = self._device[MAP_NAME]
        for first, at, count in row_runs(rows):
            self._stream.to_host(self._host_maps[at : at + count], device_maps + first * self._map_bytes)
        self._stream.synchronize()
        return self._host_maps[: len(rows)]

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()  # before the stream: it synchronises and frees on it
        # A build still running is dropped, not awaited: it holds nothing of this back end, and waiting
        # could hold up the scoring thread (an old model closes there after a swap) for a minute.
        self._engines, self._refused, self._builds = {}, {}, {}
        for graph in self._graphs.values():
            try:
                graph.close()
            except CudaError as error:
                log.error("releasing a CUDA graph: %s", error)
        self._graphs = {}
        self._stream.close()
        # The context must go before the engine, the engine before the runtime.
        del self._context
        del self._engine
        del self._runtime


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None when it is not installed."""
    try:
        return str(import_tensorrt().__version__)
    except BackendUnavailable:
        return None
