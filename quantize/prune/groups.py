"""Channel pruning's dependency analysis: which tensors' channel axes must
stay aligned, and whether such a *channel group* may be pruned.

A group is found by walking the graph from a convolution's output, forwards
and backwards, through channel-preserving ops (activations, pools, depthwise
convs, BatchNorm, a Flatten — after which a channel owns the H*W columns of
its map — and binary ops with a scalar constant) and through elementwise
joins of two activations (a residual ``Add``). Its *sources* are the
convolutions that produce those channels, its *sinks* the layers that read
them as input channels. A group that reaches anything else (a graph output, a
Concat, a Reshape, a grouped convolution, a shared initializer, ...) gets the
reason in :attr:`Group.problems` (see :func:`check_group`), so an unknown
architecture is pruned less, never wrongly.

Reads the graph only; one :class:`~quantize.prune.graph.GraphIndex` per
thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import onnx

from quantize.prune.graph import FLOAT_TYPES, GraphIndex, attribute, conv_kind, node_name


# One data input, one output, the same channels in and out, nothing per-channel
# to slice. Inputs past the first must be scalar constants (Clip's min/max).
ELEMENTWISE = {
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
    "Selu", "Celu", "Gelu", "Mish", "Softplus", "Softsign", "ThresholdedRelu", "Erf", "Identity",
    "Dropout", "Neg", "Abs", "Sqrt", "Exp", "Log", "Reciprocal", "Floor", "Ceil", "Round", "Cast",
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
}
# What makes a channel group worth pruning by default: a removed channel of a
# purely linear bottleneck is a rank cut of W_next @ W_this, which filter norms
# (or a few calibration pictures) predict badly; MobileNetV2's 16- and
# 320-channel projections are such bottlenecks.
NONLINEAR = ELEMENTWISE - {
    "Identity", "Dropout", "Neg", "Cast", "AveragePool", "GlobalAveragePool",
}
# Elementwise with two operands: channel-preserving with a scalar constant,
# a join of two channel spaces with another activation of the same shape.
_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"}


@dataclass
class Group:
    """One channel group: its tensors and the nodes that produce, carry, join and read its channels."""

    tensors: set[str] = field(default_factory=set)
    # consecutive elements per channel along axis 1: 1, or H*W after a Flatten of an HxW map
    block: dict[str, int] = field(default_factory=dict)
    sources: list[onnx.NodeProto] = field(default_factory=list)
    depthwise: list[onnx.NodeProto] = field(default_factory=list)
    batchnorms: list[onnx.NodeProto] = field(default_factory=list)
    sinks: list[tuple[onnx.NodeProto, str]] = field(default_factory=list)  # (node, "conv"|"gemm_t"|"gemm"|"matmul")
    joins: list[onnx.NodeProto] = field(default_factory=list)
    chain: list[onnx.NodeProto] = field(default_factory=list)  # every node carrying the channels on
    problems: list[str] = field(default_factory=list)

    def slices(self, index: GraphIndex) -> list[str]:
        """Initializer names this group would slice."""
        names = []
        for node in [*self.sources, *self.depthwise]:
            names += [n for n in node.input[1:3] if n]
        for node in self.batchnorms:
            names += list(node.input[1:5])
        for node, _ in self.sinks:
            names.append(index.weight(node)[1])
        return names


def _is_scalar_const(index: GraphIndex, name: str) -> bool:
    if not name:
        return True  # an omitted optional input
    value = index.const(name)
    return value is not None and value.size == 1


def _flatten_block(index: GraphIndex, node: onnx.NodeProto) -> int | None:
    """Columns per channel after a ``Flatten(axis=1)`` of a static map (H*W), or None."""
    shape = index.shapes.get(node.input[0])
    if attribute(node, "axis", 1) != 1 or shape is None or len(shape) < 2:
        return None
    if not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        return None
    return math.prod(shape[2:])


def _same_shape(index: GraphIndex, names: Sequence[str]) -> bool:
    shapes = [index.shapes.get(n) for n in names]
    return all(s is not None and None not in s for s in shapes) and len(set(shapes)) == 1  # type: ignore[union-attr]


def _grow(index: GraphIndex, start: str) -> Group:
    """The channel group of tensor ``start``: walk producers and consumers to a fixpoint."""
    group = Group()
    todo: list[str] = []
    visited: set[tuple[int, bool | None]] = set()

    def add(name: str, block: int = 1) -> None:
        if name not in group.tensors:
            group.tensors.add(name)
            group.block[name] = block
            todo.append(name)
        elif group.block[name] != block:
            group.problems.append(f"{name} is reached with two channel layouts")

    add(start)

    def passthrough(node: onnx.NodeProto, data_inputs: Sequence[int]) -> bool:
        """Whether ``node`` carries the channels of its data inputs unchanged to output 0."""
        extra_used = any(index.uses.get(o, 0) for o in node.output[1:] if o)
        if extra_used:
            group.problems.append(f"{node.op_type} {node_name(node)} has a second output in use")
            return False
        others = [n for i, n in enumerate(node.input) if i not in data_inputs]
        if node.op_type == "PRelu" and not _is_scalar_const(index, node.input[1]):
            group.problems.append(f"PRelu {node_name(node)} has per-channel slopes")
            return False
        if not all(_is_scalar_const(index, n) for n in others):
            group.problems.append(f"{node.op_type} {node_name(node)} has a non-scalar operand")
            return False
        return True

    def visit_node(node: onnx.NodeProto, via: str, forward: bool) -> None:
        """``node`` reads (forward) or writes (backward) ``via``, a tensor of the group."""
        op = node.op_type
        name = node_name(node)
        kind = conv_kind(node, index) if op == "Conv" else None
        # A plain conv may be both a sink (reads the channels) and a source
        # (writes them, e.g. y = x + conv(x)); every other node joins once.
        key = (id(node), forward if kind == "conv" else None)
        if key in visited:
            return
        visited.add(key)
        block = group.block[via]
        if op == "Conv":
            if forward and node.input[0] != via:
                group.problems.append(f"used as a weight by Conv {name}")
            elif kind == "conv" and forward:
                group.sinks.append((node, "conv"))
            elif kind == "conv":
                group.sources.append(node)
            elif kind == "depthwise":
                group.depthwise.append(node)
                group.chain.append(node)
                add(node.input[0], block)
                add(node.output[0], block)
            else:
                group.problems.append(f"{'reaches' if forward else 'comes from'} {kind} Conv {name}")
        elif op == "BatchNormalization":
            if forward and node.input[0] != via:
                group.problems.append(f"used as a parameter by BatchNormalization {name}")
            elif not all(n in index.inits for n in node.input[1:5]):
                group.problems.append(f"BatchNormalization {name} has computed parameters")
            elif passthrough(node, (0, 1, 2, 3, 4)):
                group.batchnorms.append(node)
                group.chain.append(node)
                add(node.input[0], block)
                add(node.output[0], block)
        elif op in ELEMENTWISE or (op == "Flatten" and _flatten_block(index, node) is not None):
            factor = _flatten_block(index, node) if op == "Flatten" else 1
            if forward and node.input[0] != via:
                group.problems.append(f"used as a parameter by {op} {name}")
            elif not forward and block % factor:
                group.problems.append(f"comes from Flatten {name} with another channel layout")
            elif passthrough(node, (0,)):
                group.chain.append(node)
                add(node.input[0], block if forward else block // factor)
                add(node.output[0], block * factor if forward else block)
        elif op in _BINARY:
            activations = [n for n in node.input if not _is_scalar_const(index, n)]
            if len(activations) == 1:
                group.chain.append(node)
                add(activations[0], block)
                add(node.output[0], block)
            elif op != "Pow" and _same_shape(index, [*activations, node.output[0]]):
                group.joins.append(node)
                group.chain.append(node)
                for n in activations:
                    add(n, block)
                add(node.output[0], block)
            else:
                group.problems.append(f"{'reaches' if forward else 'comes from'} {op} {name} with a broadcast operand")
        elif op in ("Gemm", "MatMul") and forward:
            found = index.weight(node)
            shape = index.shapes.get(via)
            if node.input[0] != via or found is None or found[0] != 1:
                group.problems.append(f"reaches {op} {name} other than as its data input")
            elif shape is None or len(shape) != 2:
                group.problems.append(f"reaches {op} {name} with a tensor that is not [batch, channels]")
            elif op == "Gemm" and attribute(node, "transA", 0):
                group.problems.append(f"reaches Gemm {name} with transA")
            elif op == "Gemm":
                group.sinks.append((node, "gemm_t" if attribute(node, "transB", 0) else "gemm"))
            else:
                group.sinks.append((node, "matmul"))
        else:
            group.problems.append(f"{'reaches' if forward else 'comes from'} {op} {name}")

    while todo:
        tensor = todo.pop()
        if tensor in index.inits:
            group.problems.append(f"meets the constant {tensor}")
        if tensor in index.outputs:
            group.problems.append(f"reaches the graph output {tensor}")
        if tensor in index.opaque:
            group.problems.append(f"{tensor} is read inside a subgraph")
        if tensor in index.inputs:
            group.problems.append(f"comes from the graph input {tensor}")
        producer = index.producer.get(tensor)
        if producer is not None and producer.output[0] == tensor:
            visit_node(producer, tensor, forward=False)
        elif producer is not None:
            group.problems.append(f"comes from output {tensor} of {producer.op_type} {node_name(producer)}")
        for node, _ in index.consumers.get(tensor, []):
            visit_node(node, tensor, forward=True)
    return group


def find_groups(index: GraphIndex) -> list[Group]:
    groups: list[Group] = []
    seen: set[str] = set()
    for node in index.nodes:
        if node.op_type == "Conv" and conv_kind(node, index) == "conv" and node.output[0] not in seen:
            group = _grow(index, node.output[0])
            seen |= group.tensors
            groups.append(group)
    return groups


def check_group(index: GraphIndex, group: Group) -> str | None:
    """Why this group cannot be pruned, or None."""
    if group.problems:
        return "; ".join(dict.fromkeys(group.problems))
    widths = {int(index.inits[s.input[1]].dims[0]) for s in group.sources}
    if len(widths) != 1:
        return f"its sources disagree on the channel count ({sorted(widths)})"
    sink_biases = [n.input[2] for n, _ in group.sinks if len(n.input) > 2 and n.input[2]]
    for name in [*group.slices(index), *sink_biases]:
        if name not in index.inits:
            return f"{name} is computed at run time, not an initializer"
        if index.uses.get(name, 0) != 1:
            return f"initializer {name} is shared with another node"
        if index.inits[name].data_type not in FLOAT_TYPES:
            return f"initializer {name} is not floating point"
    return None
