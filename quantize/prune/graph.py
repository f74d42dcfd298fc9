"""The graph index both pruning passes read: who produces and who reads each
tensor of a main graph, which are initializers or constants, their inferred
shapes, and small questions about one node (its name, an attribute, where its
weight is, what kind of convolution it is).

An index describes the graph as it was when it was built; a pass that
changes initializers goes through :func:`replace_initializer` so the index
keeps pointing at the live protos. Not thread-safe: one index per pass, used
by the thread that built it.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

#: Element types of weights a pass may change (not already quantized ones).
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}

# Where the weight of a layer is, by op type: the first of these inputs that
# is an initializer (MatMul may carry its constant on either side).
_WEIGHT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (1, 0), "MatMul": (1, 0)}


def node_name(node: onnx.NodeProto) -> str:
    """The node's name, or its first output's when it has none."""
    return node.name or node.output[0]


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of the node's attribute ``name``, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Every tensor name read anywhere inside the node's subgraphs (If/Loop/Scan bodies)."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for sub in g.node:
                names.update(sub.input)
                names |= subgraph_inputs(sub)
    return names


class GraphIndex:
    """Producers, consumers, initializers, constants and shapes of a main graph."""

    def __init__(self, model: onnx.ModelProto, *, shapes: bool = False) -> None:
        graph = model.graph
        self.graph = graph
        self.inits = {init.name: init for init in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        self.uses: dict[str, int] = defaultdict(int)
        self.constants: dict[str, onnx.NodeProto] = {}
        self.opaque: set[str] = set()  # read inside a subgraph: we cannot see how
        # The node objects every lookup hands out; identity (id()) is only
        # meaningful among these, never across two iterations of graph.node.
        self.nodes = list(graph.node)
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for i, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, i))
                    self.uses[name] += 1
            if node.op_type == "Constant":
                self.constants[node.output[0]] = node
            self.opaque |= subgraph_inputs(node)
        for name in self.opaque:
            self.uses[name] += 1
        self.outputs = {o.name for o in graph.output}
        for name in self.outputs:
            self.uses[name] += 1
        self.inputs = {i.name for i in graph.input if i.name not in self.inits}
        # dims: an int, the dim_param name of a symbolic dim, or None when unknown
        self.shapes: dict[str, tuple[int | str | None, ...]] = {}
        self.types: dict[str, int] = {}
        if shapes:
            try:
                inferred = shape_inference.infer_shapes(model)
            except Exception:  # noqa: BLE001 - no shapes only means less is pruned
                inferred = model
            for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
                t = vi.type.tensor_type
                self.types[vi.name] = t.elem_type
                if t.HasField("shape"):
                    self.shapes[vi.name] = tuple(
                        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
                    )

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer or Constant node), else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.constants.get(name)
        if node is not None:
            value = attribute(node, "value")
            if isinstance(value, onnx.TensorProto):
                return numpy_helper.to_array(value)
        return None

    def weight(self, node: onnx.NodeProto) -> tuple[int, str] | None:
        """``(input index, initializer name)`` of a layer's weight, if it is an initializer."""
        for i in _WEIGHT_INPUTS.get(node.op_type, (1,)):
            if i < len(node.input) and node.input[i] in self.inits:
                return i, node.input[i]
        return None


def replace_initializer(index: GraphIndex, name: str, array: np.ndarray) -> None:
    """Give initializer ``name`` the value ``array`` (cast to its dtype), in place."""
    init = index.inits[name]
    array = array.astype(numpy_helper.to_array(init).dtype, copy=False)
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))


def conv_kind(node: onnx.NodeProto, index: GraphIndex) -> str:
    """"conv" (group 1), "depthwise" (multiplier 1), "grouped", or "dynamic" (weight not constant)."""
    if node.input[1] not in index.inits or (len(node.input) > 2 and node.input[2] and node.input[2] not in index.inits):
        return "dynamic"
    group = attribute(node, "group", 1)
    if group == 1:
        return "conv"
    w = index.inits[node.input[1]].dims
    if group == w[0] and w[1] == 1:
        return "depthwise"
    return "grouped"

