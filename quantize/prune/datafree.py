"""Channel pruning without data: which channels go (the smallest filters,
:func:`importance`) and how the loss is repaired (their constant part folded
into the readers' biases, :func:`constant_activations` and :func:`sink_delta`).

A removed channel's activation is the response of its filters plus a
constant (biases, activations of biases, ...). The response is what the L1
criterion bets is small; the constant is known without data, and dropping it
shifts every downstream layer (on MobileNetV2, pruning a quarter of one
expansion without it flipped every top-1 answer on the test photos; with
it, a third). So the constant each removed channel would have fed a sink
is folded into that sink's bias: exact when the removed filters are zero
(up to zero-padding at the borders of 3x3 layers), close when small.

Pure functions of the graph and the arrays given; safe from any thread.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from quantize.prune.graph import FLOAT_TYPES, GraphIndex, attribute
from quantize.prune.groups import Group


def importance(index: GraphIndex, group: Group) -> np.ndarray:
    """L1 norm of each channel's filters, summed over sources (each scaled to mean 1)."""
    total = np.zeros(int(index.inits[group.sources[0].input[1]].dims[0]))
    for src in group.sources:
        w = numpy_helper.to_array(index.inits[src.input[1]])
        l1 = np.abs(w.reshape(w.shape[0], -1)).sum(axis=1).astype(np.float64)
        total += l1 / l1.mean() if l1.mean() > 0 else l1
    return total


def _unary(op: str, node: onnx.NodeProto, index: GraphIndex):
    """A numpy function for a channel-preserving op applied to constants, or None."""
    def scalar(i: int, attr: str, default: float) -> float:
        if i < len(node.input) and node.input[i]:
            return float(index.const(node.input[i]).reshape(()))
        return float(attribute(node, attr, default))

    def erf(x):
        return np.vectorize(math.erf)(x)

    if op == "Relu":
        return lambda x: np.maximum(x, 0)
    if op == "Clip":
        lo, hi = scalar(1, "min", -np.inf), scalar(2, "max", np.inf)
        return lambda x: np.clip(x, lo, hi)
    if op == "LeakyRelu":
        a = float(attribute(node, "alpha", 0.01))
        return lambda x: np.where(x >= 0, x, a * x)
    if op == "PRelu":
        a = scalar(1, "", 0.0)
        return lambda x: np.where(x >= 0, x, a * x)
    if op == "HardSigmoid":
        a, b = float(attribute(node, "alpha", 0.2)), float(attribute(node, "beta", 0.5))
        return lambda x: np.clip(a * x + b, 0, 1)
    if op == "Elu" or op == "Celu":
        a = float(attribute(node, "alpha", 1.0))
        return lambda x: np.where(x >= 0, x, a * (np.exp(x / a if op == "Celu" else x) - 1))
    if op == "Selu":
        a = float(attribute(node, "alpha", 1.6732632423543772))
        g = float(attribute(node, "gamma", 1.0507009873554805))
        return lambda x: g * np.where(x > 0, x, a * (np.exp(x) - 1))
    if op == "ThresholdedRelu":
        a = float(attribute(node, "alpha", 1.0))
        return lambda x: np.where(x > a, x, 0)
    if op == "Gelu":
        if attribute(node, "approximate", b"none") in (b"tanh", "tanh"):
            return lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        return lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2)))
    if op == "Cast":
        return (lambda x: x) if attribute(node, "to") in FLOAT_TYPES else None
    table = {
        "Sigmoid": lambda x: 1 / (1 + np.exp(-x)),
        "HardSwish": lambda x: x * np.clip(x / 6 + 0.5, 0, 1),
        "Tanh": np.tanh,
        "Softplus": lambda x: np.log1p(np.exp(x)),
        "Softsign": lambda x: x / (1 + np.abs(x)),
        "Mish": lambda x: x * np.tanh(np.log1p(np.exp(x))),
        "Erf": erf,
        "Neg": np.negative, "Abs": np.abs, "Sqrt": np.sqrt, "Exp": np.exp, "Log": np.log,
        "Reciprocal": np.reciprocal, "Floor": np.floor, "Ceil": np.ceil, "Round": np.round,
    }
    if op in table:
        return table[op]
    if op in ("Identity", "Dropout", "Flatten", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"):
        return lambda x: x
    return None  # LpPool and friends: not worth it


_JOIN = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
    "Max": np.maximum, "Min": np.minimum, "Pow": np.power,
}


def constant_activations(index: GraphIndex, group: Group, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Per-channel value of each group tensor when the sources' filters contribute nothing.

    None when some op on the way has no constant rule here (then nothing is
    compensated for the group).
    """
    values: dict[str, np.ndarray] = {}
    with np.errstate(all="ignore"):
        for src in group.sources:
            width = int(index.inits[src.input[1]].dims[0])
            bias = src.input[2] if len(src.input) > 2 else ""
            values[src.output[0]] = arrays[bias].astype(np.float64) if bias else np.zeros(width)
        position = {id(n): i for i, n in enumerate(index.nodes)}
        for node in sorted(group.chain, key=lambda n: position[id(n)]):
            op = node.op_type
            operands = [values[n] if n in values else index.const(n).astype(np.float64).reshape(())
                        for n in (node.input if op in _JOIN or op in ("Sum", "Mean") else node.input[:1]) if n]
            if op == "Conv":  # depthwise, multiplier 1: the interior of the map
                w = arrays[node.input[1]].astype(np.float64)
                b = arrays[node.input[2]] if len(node.input) > 2 and node.input[2] else 0.0
                out = operands[0] * w.reshape(w.shape[0], -1).sum(axis=1) + b
            elif op == "BatchNormalization":
                scale, bias, mean, var = (arrays[n].astype(np.float64) for n in node.input[1:5])
                eps = float(attribute(node, "epsilon", 1e-5))
                out = scale * (operands[0] - mean) / np.sqrt(var + eps) + bias
            elif op in _JOIN:
                out = _JOIN[op](operands[0], operands[1])
            elif op in ("Sum", "Mean"):
                out = sum(operands) / (len(operands) if op == "Mean" else 1)
            else:
                fn = _unary(op, node, index)
                if fn is None:
                    return None
                out = fn(operands[0])
            if not np.all(np.isfinite(out)):
                return None
            values[node.output[0]] = np.broadcast_to(out, values[next(iter(values))].shape if np.ndim(out) == 0 else out.shape)
    return values


def sink_delta(kind: str, weight: np.ndarray, const: np.ndarray, removed: np.ndarray) -> np.ndarray | None:
    """What the removed channels' constants added to a sink's ``W @ x`` (before Gemm's alpha), per output."""
    w = weight.astype(np.float64)
    if kind == "conv":
        return w[:, removed].reshape(w.shape[0], len(removed), -1).sum(axis=2) @ const[removed]
    if kind == "gemm_t":
        return w[:, removed] @ const[removed]
    if kind == "gemm":
        return const[removed] @ w[removed, :]
    return None  # MatMul has no bias to fold into
