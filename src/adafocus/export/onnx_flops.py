"""What one video costs a graph, read from the ONNX graph itself (the deployed graph is the truth):
multiply-adds (`count_gmacs`) and the largest tensor it makes (`largest_activation_bytes`).

Multiply-adds: convolutions and matrix products only (Conv, Gemm, MatMul), the same accounting as
`adafocus.model.flops` (the paper's "GFLOPs" are GMACs of the conv/linear layers). Shapes come from ONNX
shape inference with every symbolic axis set to 1, so the figures are per video.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx

from adafocus.errors import AdaFocusError

COUNTED_OPS = ("Conv", "Gemm", "MatMul")


def _with_unit_axes(model: onnx.ModelProto) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = 1
    del fixed.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(fixed, strict_mode=True, data_prop=True)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    return shapes


def _attribute(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def count_gmacs(path: str | Path) -> float:
    """GMACs of one run of the graph at batch 1 (every symbolic axis = 1)."""
    model = _with_unit_axes(onnx.load(str(path)))
    if any(n.op_type in COUNTED_OPS for f in model.functions for n in f.node):
        raise AdaFocusError(
            f"{Path(path).name} keeps matrix products inside ONNX functions", "export with optimize=True"
        )
    shapes = _shapes(model)
    total = 0
    for node in model.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        needed = [*node.input[:2], node.output[0]]
        missing = [n for n in needed if n not in shapes]
        if missing:
            raise AdaFocusError(
                f"cannot count the multiply-adds of {node.op_type} node {node.name!r} in {Path(path).name}: "
                f"no static shape for {missing}",
                "report this with the preset (shape inference left a dynamic shape)",
            )
        a, b, out = (shapes[n] for n in needed)
        if node.op_type == "Conv":  # each output element is a dot product over (C_in / groups) × kernel
            total += math.prod(out) * math.prod(b[1:])
        elif node.op_type == "Gemm":
            k = a[0] if _attribute(node, "transA") else a[1]
            total += math.prod(out) * k
        else:  # MatMul: every output element is a dot product over the shared axis
            k = a[-1] if len(a) > 1 else a[0]
            total += math.prod(out) * k
    return total / 1e9


def largest_activation_bytes(path: str | Path) -> int:
    """Bytes of the largest tensor a node of the graph produces for one video (every symbolic axis
    = 1): what decides whether a call's working set stays in the CPU's caches."""
    model = _with_unit_axes(onnx.load(str(path)))
    produced = {name for node in model.graph.node for name in node.output}
    largest = 0
    for value in [*model.graph.value_info, *model.graph.output]:
        tensor = value.type.tensor_type
        dims = tensor.shape.dim
        if value.name in produced and tensor.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
            largest = max(largest, math.prod(d.dim_value for d in dims) * itemsize)
    return largest
