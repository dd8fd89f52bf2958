"""What an exported scoring graph costs: tensor shapes, memory, FLOPs and bytes, and its bank search.

Shapes come from ONNX Runtime's symbolic shape inference at a fixed batch (the backbone's
"same" padding is computed from Shape ops, which plain ONNX shape inference cannot follow).
Everything here runs on a CPU; `lineguard-train build-engine` uses it to refuse a build that
cannot fit the memory budget before TensorRT is asked, and bench/gpu_bench.py for its floor.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..errors import EngineBuildError

log = logging.getLogger(__name__)

MIB = 2**20
# Ops that only move or describe shapes: no arithmetic worth counting.
_SHAPE_OPS = frozenset(
    {
        *("Shape", "Gather", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Constant", "ConstantOfShape", "Cast"),
        *("Slice", "Transpose", "Expand", "Flatten", "Equal", "Where", "Identity", "Pad"),
    }
)


@dataclass(frozen=True, slots=True)
class Tensor:
    """A tensor of the graph at a fixed batch."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Device memory a built engine will want: weights, activations and the builder workspace, bytes."""

    batch: int
    weights_bytes: int
    largest_activation: Tensor
    workspace_bytes: int

    @property
    def total_bytes(self) -> int:
        # The largest op's input and output live together; everything smaller reuses that memory.
        return self.weights_bytes + 2 * self.largest_activation.nbytes + self.workspace_bytes

    def describe(self) -> str:
        return (
            f"{self.total_bytes / MIB:.0f} MiB at batch {self.batch}: weights {self.weights_bytes / MIB:.1f} MiB, "
            f"2 x largest activation {self.largest_activation.name} {self.largest_activation.shape} "
            f"{self.largest_activation.nbytes / MIB:.1f} MiB, workspace {self.workspace_bytes / MIB:.0f} MiB"
        )


@dataclass(frozen=True, slots=True)
class GraphCost:
    """Arithmetic and the least memory traffic of one run of the graph at `batch`."""

    batch: int
    matmul_flops: int  # Conv, MatMul and Gemm: what tensor cores run
    search_flops: int  # the part of matmul_flops in the bank search (kept float32 by reduced-precision builds)
    other_flops: int  # one per output element of every other arithmetic op
    min_bytes: int  # weights + inputs + outputs: read or written at least once
    largest_activation: Tensor  # if not fused away, written once and read once more


def load_model(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def tensor_shapes(model: onnx.ModelProto, *, batch: int) -> dict[str, Tensor]:
    """Every tensor of the graph (inputs, initializers, intermediates, outputs) at a fixed batch."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for graph_input in fixed.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    inferred = SymbolicShapeInference.infer_shapes(fixed, auto_merge=True)
    tensors: dict[str, Tensor] = {}
    graph = inferred.graph
    for info in (*graph.input, *graph.value_info, *graph.output):
        tensor_type = info.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
        if -1 in dims or not tensor_type.elem_type:
            continue
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        tensors[info.name] = Tensor(info.name, dims, dtype)
    for initializer in graph.initializer:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(initializer.data_type))
        tensors[initializer.name] = Tensor(initializer.name, tuple(initializer.dims), dtype)
    missing = [out for node in graph.node for out in node.output if out and out not in tensors]
    if missing:
        msg = f"the graph's shapes are not all known at batch {batch} ({len(missing)} unknown, e.g. {missing[0]}); re-export the model"
        raise EngineBuildError(msg)
    return tensors


def weights_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer at its stored type (a float16 bank counts half)."""
    return sum(
        int(np.prod(t.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        for t in model.graph.initializer
    )


def estimate_memory(model: onnx.ModelProto, *, batch: int, workspace_bytes: int) -> MemoryEstimate:
    """Weights + 2 x the largest intermediate tensor + the builder workspace, at `batch`."""
    tensors = tensor_shapes(model, batch=batch)
    produced = {out for node in model.graph.node for out in node.output if out}
    largest = max((tensors[name] for name in produced), key=lambda t: t.nbytes)
    return MemoryEstimate(batch, weights_bytes(model), largest, workspace_bytes)


def check_memory_budget(estimate: MemoryEstimate, *, budget_mb: float) -> None:
    """EngineBuildError when the estimate exceeds the budget (checked before TensorRT is asked)."""
    if estimate.total_bytes > budget_mb * MIB:
        msg = (
            f"the engine would need about {estimate.describe()}, over the {budget_mb:.0f} MiB budget: lower "
            "--max-batch or --workspace-mb, use a smaller bank (--bank-size) or a float16 bank (--bank-dtype float16), "
            "or raise --memory-budget-mb"
        )
        raise EngineBuildError(msg)


def graph_cost(model: onnx.ModelProto, *, batch: int) -> GraphCost:
    """FLOPs and least bytes moved for one run at `batch`."""
    tensors = tensor_shapes(model, batch=batch)
    initializers = {t.name for t in model.graph.initializer}
    search_nodes = set(bank_search_nodes(model))
    matmul = search = other = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            flops = _matmul_flops(node, tensors)
            matmul += flops
            search += flops if node.name in search_nodes else 0
        elif node.op_type not in _SHAPE_OPS:
            other += sum(int(np.prod(tensors[o].shape, dtype=np.int64)) for o in node.output if o)
    io = [tensors[i.name] for i in model.graph.input if i.name not in initializers]
    io += [tensors[o.name] for o in model.graph.output]
    produced = {out for node in model.graph.node for out in node.output if out}
    largest = max((tensors[name] for name in produced), key=lambda t: t.nbytes)
    return GraphCost(batch, matmul, search, other, weights_bytes(model) + sum(t.nbytes for t in io), largest)


def _matmul_flops(node: onnx.NodeProto, tensors: dict[str, Tensor]) -> int:
    """2 x output elements x the length of the dot product behind each."""
    out = tensors[node.output[0]]
    if node.op_type == "Conv":
        # weight: (C_out, C_in / groups, kh, kw); each output element is a dot product of that length.
        inner = int(np.prod(tensors[node.input[1]].shape[1:], dtype=np.int64))
    elif node.op_type == "Gemm" and _attribute(node, "transA", 0):
        inner = tensors[node.input[0]].shape[0]
    else:
        inner = tensors[node.input[0]].shape[-1]
    return 2 * int(np.prod(out.shape, dtype=np.int64)) * inner


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(helper.get_attribute_value(attribute))
    return default


_LAYOUT_OPS = ("Pad", "Reshape", "Transpose")  # between the patch features and the search


def bank_search_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes of the memory-bank search and everything after it, in graph order.

    The search is the MatMul of patch features (a 1 appended) with a constant (the search matrix).
    Its squared distance is |p|^2 + min(|b|^2 - 2 p.b), a difference of large numbers: in float16
    it cancels, so a reduced-precision build keeps these nodes in float32. Found from the MatMul's
    other input downwards, and from above the Pad, Reshape or Transpose that feed it (the patch
    features themselves), so the |p|^2 branch is included.
    """
    constants = {t.name for t in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    searches = [n for n in model.graph.node if n.op_type == "MatMul" and any(i in constants for i in n.input)]
    if not searches:
        return []
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    queue = deque(_search_inputs(model, searches, constants))
    seen_tensors, chosen = set(queue), set()
    while queue:
        for node in consumers.get(queue.popleft(), ()):
            if node.name in chosen:
                continue
            chosen.add(node.name)
            for out in node.output:
                if out not in seen_tensors:
                    seen_tensors.add(out)
                    queue.append(out)
    return [node.name for node in model.graph.node if node.name in chosen]


def _search_inputs(model: onnx.ModelProto, searches: list[onnx.NodeProto], constants: set[str]) -> list[str]:
    """The searches' non-constant inputs, and the tensors above each through Pad, Reshape or Transpose."""
    producers = {out: node for node in model.graph.node for out in node.output}
    seeds = [i for n in searches for i in n.input if i not in constants]
    for seed in list(seeds):
        above = producers.get(seed)
        while above is not None and above.op_type in _LAYOUT_OPS:
            seeds.append(above.input[0])
            above = producers.get(above.input[0])
    return seeds
