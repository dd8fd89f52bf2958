"""What every TensorRT build here shares: an ONNX graph parsed into a network, and the agent's batch profile.

Two builds use it: the trainer's model engines (`lineguard-train build-engine`) and the agent's
per-camera frame engines (backends/tensorrt_frames.py). It lives in the agent because the trainer
may import the agent, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any


class OnnxParseError(ValueError):
    """TensorRT's ONNX parser refused a graph; the message carries the parser's errors."""


@dataclass(frozen=True, slots=True)
class ParsedNetwork:
    """A network parsed from ONNX, with what must outlive its build.

    The builder keeps a pointer to the logger, and the parser owns weights the network refers to.
    """

    logger: Any
    builder: Any
    network: Any
    parser: Any


def parse_onnx(trt: ModuleType, graph: Path | bytes, *, name: str) -> ParsedNetwork:
    """A fresh builder and the network of `graph` (a file or serialised ONNX); OnnxParseError when it does not parse."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(graph)) if isinstance(graph, Path) else parser.parse(graph)
    if not parsed:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        msg = f"TensorRT {trt.__version__} cannot parse {name}: {errors}"
        raise OnnxParseError(msg)
    return ParsedNetwork(logger, builder, network, parser)


def profile_shapes(
    input_shape: tuple[int, ...], max_batch: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) input shapes: batch 1 to max_batch, tuned for max_batch (the overload case)."""
    return (1, *input_shape), (max_batch, *input_shape), (max_batch, *input_shape)
