"""ONNX export with a parity check: the graph the agent runs must score what torch scored.

One graph per model: `image` (N, H, W, C) uint8 in, `score` (N,) and `anomaly_map` (N, H, W)
float32 out, normalisation inside. The batch axis is dynamic; so are height and width for
fully convolutional models, whose parity is then also checked at a second size. Export fails loudly when ONNX
Runtime disagrees with torch beyond tolerance, so a bad graph never reaches a bundle.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import ExportError
from .scoring import score_images

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "anomaly_map")


@dataclass(frozen=True, slots=True)
class ParityReport:
    """How closely ONNX Runtime matched torch on n_images."""

    n_images: int
    max_score_rel_diff: float
    max_map_rel_diff: float
    score_rtol: float
    map_rtol: float
    providers: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def export_onnx(
    model: torch.nn.Module, path: Path, *, height: int, width: int, channels: int, variable_size: bool = False
) -> Path:
    """Trace the model into an ONNX graph with a dynamic batch axis (and dynamic height and width if variable_size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((2, height, width, channels), dtype=torch.uint8)
    image_axes = {0: "n", 1: "height", 2: "width"} if variable_size else {0: "n"}
    dynamic_axes = {INPUT_NAME: image_axes, "score": {0: "n"}, "anomaly_map": image_axes}
    with warnings.catch_warnings():
        # The TorchScript exporter gives a plain static graph for a fixed-size model; torch
        # deprecates it in favour of the dynamo exporter, which needs onnxscript.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # harmless: folds less
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    import onnx

    store_exact_halves(path)
    onnx.checker.check_model(str(path))
    return path


def store_exact_halves(path: Path, *, min_bytes: int = 1 << 14) -> list[str]:
    """Store large float32 initializers whose every value is a float16 as float16 plus a Cast; returns their names.

    A float16 memory bank reaches the graph as float32: the exporter folds its Cast to float32
    into the constant. Its values are still exact halves, so storing them as such loses nothing
    and halves the bundle; ONNX Runtime and TensorRT fold the Cast again when they load it.
    Large Constant nodes (the exporter's form for a module's non-persistent buffers, such as
    PatchCore's search matrix) become initializers first, so they are considered too.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    promoted = 0
    for node in list(graph.node):
        value = node.attribute[0].t if node.op_type == "Constant" and node.attribute[0].name == "value" else None
        if value is not None and value.data_type == TensorProto.FLOAT and 4 * int(np.prod(value.dims)) >= min_bytes:
            value.name = node.output[0]
            graph.initializer.append(value)
            graph.node.remove(node)
            promoted += 1
    halved: list[str] = []
    for index, initializer in enumerate(list(graph.initializer)):
        if initializer.data_type != TensorProto.FLOAT or 4 * int(np.prod(initializer.dims)) < min_bytes:
            continue
        values = numpy_helper.to_array(initializer)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            continue
        name = initializer.name
        graph.initializer[index].CopyFrom(numpy_helper.from_array(half, f"{name}_float16"))
        graph.node.insert(0, helper.make_node("Cast", [f"{name}_float16"], [name], to=TensorProto.FLOAT))
        halved.append(name)
    if halved or promoted:
        onnx.save(model, str(path))
    if halved:
        log.info("stored %d initializer(s) as exact float16: %s", len(halved), ", ".join(halved))
    return halved


def cpu_session(path: Path) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for the exported graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(
    session: ort.InferenceSession, images: np.ndarray, *, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """(scores (N,), maps (N, H, W)) from an ONNX Runtime session."""
    scores, maps = [], []
    for start in range(0, len(images), batch_size):
        batch_scores, batch_maps = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[start : start + batch_size]})
        scores.append(batch_scores)
        maps.append(batch_maps)
    return np.concatenate(scores), np.concatenate(maps)


def check_parity(
    model: torch.nn.Module,
    onnx_path: Path,
    images: np.ndarray,
    *,
    score_rtol: float = 1e-4,
    map_rtol: float = 1e-3,
) -> ParityReport:
    """Compare ONNX Runtime with torch on images; raise ExportError past tolerance.

    Scores must agree within score_rtol relative; maps within map_rtol of the largest map value
    (near-zero distances carry float32 cancellation noise that a relative bound would magnify).
    """
    if len(images) == 0:
        msg = "parity check needs at least one image"
        raise ExportError(msg)
    torch_scores, torch_maps = score_images(model, images)
    session = cpu_session(onnx_path)
    onnx_scores, onnx_maps = run_onnx(session, images)
    report = compare_outputs(torch_scores, torch_maps, onnx_scores, onnx_maps, score_rtol=score_rtol, map_rtol=map_rtol)
    return ParityReport(
        n_images=len(images),
        max_score_rel_diff=report[0],
        max_map_rel_diff=report[1],
        score_rtol=score_rtol,
        map_rtol=map_rtol,
        providers=tuple(session.get_providers()),
    )


def compare_outputs(
    reference_scores: np.ndarray,
    reference_maps: np.ndarray,
    scores: np.ndarray,
    maps: np.ndarray,
    *,
    score_rtol: float,
    map_rtol: float,
) -> tuple[float, float]:
    """(max relative score difference, max map difference / map scale); ExportError past tolerance."""
    if scores.shape != reference_scores.shape or maps.shape != reference_maps.shape:
        msg = f"ONNX output shapes {scores.shape}, {maps.shape} differ from torch {reference_scores.shape}, {reference_maps.shape}"
        raise ExportError(msg)
    score_scale = np.maximum(np.abs(reference_scores), np.finfo(np.float32).tiny)
    score_diff = float(np.max(np.abs(scores - reference_scores) / score_scale))
    map_scale = max(float(np.max(np.abs(reference_maps))), float(np.finfo(np.float32).tiny))
    map_diff = float(np.max(np.abs(maps - reference_maps)) / map_scale)
    if not (score_diff <= score_rtol and map_diff <= map_rtol):
        msg = (
            f"ONNX parity failed: scores differ by {score_diff:.2e} relative (limit {score_rtol:.0e}), maps by "
            f"{map_diff:.2e} of their range (limit {map_rtol:.0e}); the exported graph is not the trained model: "
            "check the torch/onnx/onnxruntime versions and report the model settings"
        )
        raise ExportError(msg)
    return score_diff, map_diff


def write_parity_report(report: ParityReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
