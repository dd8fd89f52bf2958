"""Build a TensorRT plan from the bundle's ONNX graph with the TensorRT 10 Python API.

Explicit batch (the TensorRT 10 default), one optimisation profile from batch 1 to the agent's
engine.max_batch, a timing cache kept between builds, FP16 or INT8 (entropy calibration on good
images), and TF32 off for an fp32 build so fp32 means fp32. The memory-bank search (a matrix
product whose squared distances are differences of large numbers) runs in fp16 on tensor cores
by default, never in int8; `search_precision="fp32"` pins it to float32 for models whose fp16
parity check fails (on a Hopper GPU 15x its arithmetic time, 4-5x the graph's floor: BENCHMARKS.md).
tensorrt is imported inside the functions: without it, EngineBuildError says how to get it. Only
API present in both TensorRT 10 (JetPack 6) and the PyPI releases after it is used.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np

from lineguard.agent.engine.backends import BackendUnavailable
from lineguard.agent.engine.backends.tensorrt import INPUT_NAME, import_tensorrt
from lineguard.agent.engine.backends.tensorrt_network import OnnxParseError, parse_onnx, profile_shapes

from ..errors import EngineBuildError
from .calibration import entropy_calibrator
from .graph_cost import MIB
from .parity import Precision

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BuildOptions:
    """How to build: precision, the largest batch, builder workspace and where the timing cache lives."""

    precision: Precision
    max_batch: int
    workspace_mb: int
    timing_cache: Path | None = None
    search_precision: Literal["fp32", "fp16"] | None = None  # None: fp32 for fp32 builds, else fp16

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.workspace_mb < 1:
            msg = f"--max-batch and --workspace-mb must be >= 1, got {self.max_batch}, {self.workspace_mb}"
            raise EngineBuildError(msg)
        if self.precision == "fp32" and self.search_precision == "fp16":
            msg = "an fp32 build keeps the bank search in fp32: drop --search-precision fp16 or build fp16"
            raise EngineBuildError(msg)

    @property
    def search(self) -> Literal["fp32", "fp16"]:
        """The precision the bank search runs at."""
        return self.search_precision or ("fp32" if self.precision == "fp32" else "fp16")


def tensorrt_module() -> ModuleType:
    """tensorrt, or EngineBuildError (exit 2) saying how to install it."""
    try:
        return import_tensorrt()
    except BackendUnavailable as error:
        msg = f"{error}; build engines on a machine with an NVIDIA GPU of the agent's kind"
        raise EngineBuildError(msg) from error


def build_plan(
    onnx_path: Path,
    options: BuildOptions,
    *,
    input_shape: tuple[int, int, int],
    search_nodes: Collection[str],
    calibration_images: np.ndarray | None,
) -> bytes:
    """The serialised engine for onnx_path; EngineBuildError with TensorRT's reasons when it fails."""
    trt = tensorrt_module()
    try:
        parsed = parse_onnx(trt, onnx_path, name=str(onnx_path))
    except OnnxParseError as error:
        raise EngineBuildError(str(error)) from error
    builder, network = parsed.builder, parsed.network
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb * MIB)
    cached = options.timing_cache.read_bytes() if options.timing_cache and options.timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cached), False)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, *profile_shapes(input_shape, options.max_batch))
    config.add_optimization_profile(profile)
    _set_precision(trt, config, network, options, search_nodes)
    calibrator = None
    if options.precision == "int8":
        if calibration_images is None:
            msg = "an int8 build needs good images to calibrate on: pass --calibration-images DIR"
            raise EngineBuildError(msg)
        calibrator = entropy_calibrator(trt, calibration_images, batch_size=options.max_batch, input_name=INPUT_NAME)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)
    try:
        plan = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.close()
    if plan is None:
        msg = f"TensorRT {trt.__version__} could not build {onnx_path} at {options.precision} (its log above says why)"
        raise EngineBuildError(msg)
    if options.timing_cache is not None:
        _save_timing_cache(config, options.timing_cache)
    return bytes(plan)


def _set_precision(
    trt: ModuleType, config: Any, network: Any, options: BuildOptions, search_nodes: Collection[str]
) -> None:
    if options.precision == "fp32":
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # TF32 keeps 10 mantissa bits: not the fp32 the check expects
        return
    wanted = ("FP16",) if options.precision == "fp16" else ("INT8", "FP16")  # int8 falls back to fp16, not fp32
    missing = [flag for flag in wanted if not hasattr(trt.BuilderFlag, flag)]
    if missing:
        msg = f"TensorRT {trt.__version__} has no builder flag {', '.join(missing)} (weakly typed builds removed?); build fp32"
        raise EngineBuildError(msg)
    for flag in wanted:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if options.search == options.precision:
        return  # fp16 build, fp16 search: nothing to pin
    obey = getattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS", None)
    if obey is None:
        msg = f"TensorRT {trt.__version__} cannot pin layer precisions (no OBEY_PRECISION_CONSTRAINTS); build fp16 or fp32"
        raise EngineBuildError(msg)
    dtype = trt.float32 if options.search == "fp32" else trt.float16
    pinned = pin_precision(trt, network, search_nodes, dtype)
    config.set_flag(obey)
    log.info("%s build: %d layers of the bank search pinned to %s", options.precision, pinned, options.search)


def pin_precision(trt: ModuleType, network: Any, names: Collection[str], dtype: Any) -> int:
    """Run the layers named after the ONNX nodes in `names` at dtype; returns how many were pinned.

    Only layers whose outputs are all floating point are pinned (shape arithmetic stays integer).
    If the ONNX parser named no layer after those nodes, a warning says so and the parity check
    alone guards the result.
    """
    wanted, pinned, floats = set(names), 0, (trt.float32, trt.float16)
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        if layer.name not in wanted or not all(out.dtype in floats for out in outputs):
            continue
        layer.precision = dtype
        for i in range(layer.num_outputs):
            layer.set_output_type(i, dtype)
        pinned += 1
    if names and pinned == 0:
        log.warning("no TensorRT layer is named after the bank-search nodes; it runs at the build precision")
    return pinned


def _save_timing_cache(config: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(bytes(config.get_timing_cache().serialize()))
    partial.replace(path)
    log.info("timing cache saved to %s", path)
