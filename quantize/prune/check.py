"""The last step of channel pruning: the rewritten graph must pass strict
shape inference and the full ONNX checker, and every layer's weights must
match the width of what it reads (which ONNX shape inference does not
compare for Conv). A graph that fails is a bug of the pass
(:class:`~quantize.errors.QuantizeError`, exit 1), never a silent bad model.

Pure functions of the model given; safe from any thread.
"""

from __future__ import annotations

import onnx
from onnx import shape_inference

from quantize.errors import QuantizeError
from quantize.prune.graph import GraphIndex, attribute, node_name


def reinfer(model: onnx.ModelProto) -> None:
    """Drop the stale value_info, infer it again strictly, run the full checker
    and check every layer's channel counts (which ONNX shape inference does
    not compare for Conv)."""
    del model.graph.value_info[:]
    try:
        inferred = shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        onnx.checker.check_model(inferred, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise QuantizeError(f"channel pruning produced an invalid graph (a bug): {exc}") from None
    problem = _channel_mismatch(inferred)
    if problem:
        raise QuantizeError(f"channel pruning produced an invalid graph (a bug): {problem}")
    model.CopyFrom(inferred)


def _channel_mismatch(model: onnx.ModelProto) -> str | None:
    """The first layer whose weights disagree with the width of what it reads, or None."""
    index = GraphIndex(model, shapes=True)
    dims = {name: tuple(init.dims) for name, init in index.inits.items()}
    for node in index.nodes:
        x = index.shapes.get(node.input[0]) if node.input else None
        width = x[1] if x is not None and len(x) > 1 and isinstance(x[1], int) else None
        name = f"{node.op_type} {node_name(node)}"
        if node.op_type == "Conv" and node.input[1] in dims:
            w = dims[node.input[1]]
            if width is not None and width != w[1] * attribute(node, "group", 1):
                return f"{name} reads {width} channels, its weight {list(w)} with group {attribute(node, 'group', 1)}"
            if len(node.input) > 2 and node.input[2] in dims and dims[node.input[2]] != (w[0],):
                return f"{name} has {w[0]} filters and a bias of shape {list(dims[node.input[2]])}"
        elif node.op_type == "BatchNormalization" and width is not None:
            for p in node.input[1:5]:
                if p in dims and dims[p] != (width,):
                    return f"{name} reads {width} channels, its {p} has shape {list(dims[p])}"
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in dims and x:
            w = dims[node.input[1]]
            k = x[0] if node.op_type == "Gemm" and attribute(node, "transA", 0) else x[-1]
            wk = w[-1] if node.op_type == "Gemm" and attribute(node, "transB", 0) else w[0 if len(w) == 1 else -2]
            if isinstance(k, int) and k != wk:
                return f"{name} reads {k} features, its weight has shape {list(w)}"
    return None
