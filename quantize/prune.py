"""Pruning of FP32 ONNX models: ``--prune magnitude:S`` and ``--prune channels:R``.

Two methods, both on an :class:`onnx.ModelProto` (onnx and numpy only), both
**in place** — copy the model first if you need the original — and both
returning a :class:`PruneReport`:

* :func:`prune_magnitude` zeroes the smallest-magnitude fraction ``S`` of the
  weights of every Conv/Gemm/MatMul layer. Shapes and latency do not change;
  the file compresses better, which is what an OTA download over MQTT costs
  (:func:`compressed_size`).
* :func:`prune_channels` removes a fraction ``R`` of the output channels of
  convolutions together with every tensor slice that depends on them
  downstream: depthwise convolutions and BatchNormalization on the way, the
  input channels of the next convolution, the input columns of a Gemm/MatMul
  head. The graph gets smaller *and* faster, and is still a plain ONNX graph
  (checker and strict shape inference pass) that ONNX Runtime and onnx2tf
  take as they took the original. Data-free, the channels with the smallest
  filter L1 norm go and their constant part is folded into the next layer's
  bias; given calibration data, the channels are chosen, and the next layer
  re-fitted, by least squares on what that layer computes (see
  :func:`prune_channels`).

How channel pruning decides what it may touch: a *channel group* is the set of
tensors whose channel axis must stay aligned. It is found by walking the graph
from each convolution's output, forwards and backwards, through
channel-preserving ops (activations, pools, depthwise convs, BatchNorm, a
Flatten — after which a channel owns the H*W columns of its map — and binary
ops with a scalar constant) and through
elementwise joins of two activations (a residual ``Add``). Its *sources* are
the convolutions that produce those channels, its *sinks* the layers that read
them as input channels. A group that reaches anything else (a graph output, a
Concat, a Reshape, a grouped convolution, a shared initializer, ...) is left
alone and reported with the reason, so an unknown architecture is pruned less,
never wrongly. Groups joined by an ``Add`` are pruned identically across every
source only with ``prune_residual=True``, and groups with no activation
between their sources and sinks (linear bottlenecks) only with
``prune_linear=True``. So by default the residual streams and bottlenecks
stay, and what is pruned is the expansion channels of inverted residual
blocks (1x1 expand -> depthwise -> 1x1 project), the stem and the last 1x1
conv before the classifier: the classic safe choice for MobileNetV2.

No fine-tuning happens here. Pruning a quarter of every expansion of
MobileNetV2 costs a lot of top-1 agreement even with calibration data (and
nearly all of it without): the report and the evaluation must say so.

Errors: arguments out of range are :class:`~quantize.errors.QuantizeInputError`
(exit 2); a result that fails the ONNX checker or shape inference is a
:class:`~quantize.errors.QuantizeError` (exit 1) and means a bug here.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from quantize.errors import QuantizeError, QuantizeInputError

__all__ = [
    "ChannelGroup",
    "LayerPrune",
    "PruneReport",
    "PruneSpec",
    "SkippedLayer",
    "compressed_size",
    "count_params",
    "prune_channels",
    "prune_magnitude",
]

#: Layers with fewer weights than this are not magnitude-pruned: the saving is
#: nil and such layers (a 3-channel stem, a tiny head) are the most sensitive.
MIN_WEIGHTS = 128

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}

# Where the weight of a layer is, by op type: the first of these inputs that
# is an initializer (MatMul may carry its constant on either side).
_WEIGHT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (1, 0), "MatMul": (1, 0)}


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerPrune:
    """One layer a pruning pass changed: its weight before and after.

    ``params_*`` count the elements of the layer's weight tensor (not its
    bias: the model totals in :class:`PruneReport` count everything);
    ``nonzero_*`` the ones that are not exactly zero.
    """

    name: str
    op_type: str
    weight: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    params_before: int
    params_after: int
    nonzero_before: int
    nonzero_after: int

    @property
    def sparsity_before(self) -> float:
        return 1.0 - self.nonzero_before / self.params_before if self.params_before else 0.0

    @property
    def sparsity_after(self) -> float:
        return 1.0 - self.nonzero_after / self.params_after if self.params_after else 0.0

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "op_type": self.op_type,
            "weight": self.weight,
            "shape_before": list(self.shape_before),
            "shape_after": list(self.shape_after),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "sparsity_before": round(self.sparsity_before, 6),
            "sparsity_after": round(self.sparsity_after, 6),
        }


@dataclass(frozen=True)
class SkippedLayer:
    """A layer (or, for channel pruning, a channel group named by its sources) left alone, and why."""

    name: str
    op_type: str
    reason: str

    def to_dict(self) -> dict:
        return {"name": self.name, "op_type": self.op_type, "reason": self.reason}


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that were pruned together: produced by ``sources``, read by ``sinks``."""

    sources: tuple[str, ...]
    sinks: tuple[str, ...]
    channels_before: int
    channels_after: int
    residual: bool
    #: how the channels were chosen and the loss repaired: "l1" (smallest
    #: filters, nothing repaired), "l1+constant" (their constant part folded
    #: into the readers' biases) or "least_squares" (calibration data, readers re-fitted)
    rule: str = "l1"

    def to_dict(self) -> dict:
        return {
            "sources": list(self.sources),
            "sinks": list(self.sinks),
            "channels_before": self.channels_before,
            "channels_after": self.channels_after,
            "residual": self.residual,
            "rule": self.rule,
        }


@dataclass
class PruneReport:
    """What a pruning pass did to a model.

    ``params_*`` / ``nonzero_*`` count every initializer element of the whole
    model (weights, biases, everything), so ``params_after < params_before``
    only for channel pruning and ``nonzero_after < nonzero_before`` for both.
    """

    method: Literal["magnitude", "channels"]
    amount: float
    params_before: int
    params_after: int
    nonzero_before: int
    nonzero_after: int
    layers: list[LayerPrune] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    groups: list[ChannelGroup] = field(default_factory=list)

    @property
    def spec(self) -> str:
        return f"{self.method}:{self.amount:g}"

    @property
    def sparsity(self) -> float:
        """Fraction of all parameters of the result that are exactly zero."""
        return 1.0 - self.nonzero_after / self.params_after if self.params_after else 0.0

    def to_dict(self) -> dict:
        return {
            "spec": self.spec,
            "method": self.method,
            "amount": self.amount,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": round(self.params_after / self.params_before, 6) if self.params_before else 1.0,
            "nonzero_before": self.nonzero_before,
            "nonzero_after": self.nonzero_after,
            "sparsity": round(self.sparsity, 6),
            "layers": [layer.to_dict() for layer in self.layers],
            "groups": [group.to_dict() for group in self.groups],
            "skipped": [skip.to_dict() for skip in self.skipped],
        }


@dataclass(frozen=True)
class PruneSpec:
    """A ``--prune`` value, checked on construction: ``magnitude:S`` or ``channels:R``.

    ``S`` is the per-layer sparsity in [0, 1); ``R`` the fraction of output
    channels to remove in [0, 1).
    """

    method: Literal["magnitude", "channels"]
    amount: float

    def __post_init__(self) -> None:
        if self.method not in ("magnitude", "channels"):
            raise QuantizeInputError(
                f"--prune: unknown method {self.method!r}; use magnitude:S or channels:R"
            )
        _check_fraction(f"--prune {self.method}", self.amount)

    @classmethod
    def parse(cls, text: str) -> "PruneSpec":
        """``"magnitude:0.5"`` -> ``PruneSpec("magnitude", 0.5)``."""
        method, sep, value = text.strip().partition(":")
        if not sep:
            raise QuantizeInputError(f"--prune {text!r}: expected magnitude:S or channels:R, e.g. channels:0.25")
        try:
            amount = float(value)
        except ValueError:
            raise QuantizeInputError(f"--prune {text!r}: {value!r} is not a number") from None
        return cls(method.strip().lower(), amount)  # type: ignore[arg-type]

    def apply(self, model: onnx.ModelProto, *, calibration=None) -> PruneReport:
        """Prune ``model`` in place with the method's defaults (``calibration``: see :func:`prune_channels`)."""
        if self.method == "magnitude":
            return prune_magnitude(model, self.amount)
        return prune_channels(model, self.amount, calibration=calibration)

    def __str__(self) -> str:
        return f"{self.method}:{self.amount:g}"


def _check_fraction(what: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise QuantizeInputError(f"{what}: {value!r} must be a fraction in [0, 1)")


# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------

def count_params(model: onnx.ModelProto) -> tuple[int, int]:
    """``(elements, nonzero elements)`` over every initializer of the main graph."""
    total = nonzero = 0
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        total += arr.size
        nonzero += int(np.count_nonzero(arr))
    return total, nonzero


def compressed_size(source: str | os.PathLike | bytes | onnx.ModelProto) -> int:
    """Bytes an OTA download of ``source`` costs, gzip level 9.

    * ``bytes`` or a ``ModelProto``: the gzip of those bytes (the serialized model);
    * a ``.tar.gz``/``.tgz`` file: its size (it already is the download);
    * any other file: the gzip of its content;
    * a folder (an unpacked bundle): the size of a ``.tar.gz`` of it, built
      in memory with sorted names and zeroed times so the number is
      reproducible.
    """
    if isinstance(source, onnx.ModelProto):
        source = source.SerializeToString()
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(gzip.compress(bytes(source), compresslevel=9, mtime=0))
    path = Path(source)
    if path.is_dir():
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w") as tar:
                for item in sorted(path.rglob("*")):
                    info = tar.gettarinfo(str(item), arcname=str(item.relative_to(path)))
                    info.mtime = 0
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    if item.is_file():
                        with open(item, "rb") as fh:
                            tar.addfile(info, fh)
                    elif item.is_dir():
                        tar.addfile(info)
        return len(buf.getvalue())
    if not path.is_file():
        raise QuantizeInputError(f"{path}: no such file or folder")
    if path.name.endswith((".tar.gz", ".tgz")):
        return path.stat().st_size
    return len(gzip.compress(path.read_bytes(), compresslevel=9, mtime=0))


# --------------------------------------------------------------------------
# Graph index shared by both passes
# --------------------------------------------------------------------------

def _node_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Every tensor name read anywhere inside the node's subgraphs (If/Loop/Scan bodies)."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for sub in g.node:
                names.update(sub.input)
                names |= _subgraph_inputs(sub)
    return names


class _Index:
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
            self.opaque |= _subgraph_inputs(node)
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
            value = _attr(node, "value")
            if isinstance(value, onnx.TensorProto):
                return numpy_helper.to_array(value)
        return None

    def weight(self, node: onnx.NodeProto) -> tuple[int, str] | None:
        """``(input index, initializer name)`` of a layer's weight, if it is an initializer."""
        for i in _WEIGHT_INPUTS.get(node.op_type, (1,)):
            if i < len(node.input) and node.input[i] in self.inits:
                return i, node.input[i]
        return None


def _sizes(arrays: Iterable[np.ndarray]) -> tuple[int, int]:
    arrays = list(arrays)
    return sum(a.size for a in arrays), sum(int(np.count_nonzero(a)) for a in arrays)


def _replace_initializer(index: _Index, name: str, array: np.ndarray) -> None:
    init = index.inits[name]
    array = array.astype(numpy_helper.to_array(init).dtype, copy=False)
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))


# --------------------------------------------------------------------------
# Magnitude pruning
# --------------------------------------------------------------------------

def prune_magnitude(
    model: onnx.ModelProto,
    sparsity: float,
    *,
    op_types: Sequence[str] = ("Conv", "Gemm", "MatMul"),
    min_weights: int = MIN_WEIGHTS,
    include_depthwise: bool = False,
) -> PruneReport:
    """Zero the smallest-magnitude ``sparsity`` fraction of each layer's weights, in place.

    Per layer exactly ``round(sparsity * n)`` weights become zero (ties broken
    by position), so a layer with no zeros before ends at that sparsity
    exactly. Only the weight input of nodes in ``op_types`` is touched, never
    biases. A layer is skipped, and reported with the reason, when its weight
    is computed at run time (not an initializer), is not floating point
    (already quantized), has fewer than ``min_weights`` elements, or is shared
    with a layer already pruned. Depthwise convolutions are left alone unless
    ``include_depthwise``: nine weights per filter, under 2 % of MobileNetV2's
    weights, and the layers where zeros hurt most (at S=0.3 pruning them too
    drops MobileNetV2's top-1 agreement on the photos from ~41 % to ~7 %).

    No fine-tuning: MobileNetV2 does not survive S=0.5 one-shot (its top-1
    agreement with fp32 falls to ~0); the size gain is real, the accuracy
    cost must be measured and reported.
    """
    _check_fraction("magnitude sparsity", sparsity)
    index = _Index(model)
    total_before, nonzero_before = count_params(model)
    report = PruneReport("magnitude", float(sparsity), total_before, total_before, nonzero_before, nonzero_before)
    done: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        name = _node_name(node)
        found = index.weight(node)
        if found is None:
            report.skipped.append(SkippedLayer(name, node.op_type, "weight is computed at run time, not an initializer"))
            continue
        _, wname = found
        if node.op_type == "Conv" and not include_depthwise and _conv_kind(node, index) == "depthwise":
            report.skipped.append(SkippedLayer(name, node.op_type, "depthwise convolution (few, sensitive weights); include_depthwise=True prunes it"))
            continue
        if wname in done:
            report.skipped.append(SkippedLayer(name, node.op_type, f"shares its weight with {done[wname]}, pruned once"))
            continue
        init = index.inits[wname]
        if init.data_type not in _FLOAT_TYPES:
            report.skipped.append(SkippedLayer(name, node.op_type, "weight is not floating point"))
            continue
        w = numpy_helper.to_array(init)
        if w.size < min_weights:
            report.skipped.append(SkippedLayer(name, node.op_type, f"only {w.size} weights (< {min_weights})"))
            continue
        done[wname] = name
        k = int(round(sparsity * w.size))
        pruned = w.copy()
        if k > 0:
            flat = pruned.reshape(-1)
            flat[np.argpartition(np.abs(flat), k - 1)[:k]] = 0
        before, after = _sizes([w]), _sizes([pruned])
        _replace_initializer(index, wname, pruned)
        report.layers.append(LayerPrune(
            name, node.op_type, wname, tuple(w.shape), tuple(w.shape), before[0], after[0], before[1], after[1],
        ))
    report.params_after, report.nonzero_after = count_params(model)
    return report


# --------------------------------------------------------------------------
# Channel pruning: the dependency analysis
# --------------------------------------------------------------------------

# One data input, one output, the same channels in and out, nothing per-channel
# to slice. Inputs past the first must be scalar constants (Clip's min/max).
_ELEMENTWISE = {
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
    "Selu", "Celu", "Gelu", "Mish", "Softplus", "Softsign", "ThresholdedRelu", "Erf", "Identity",
    "Dropout", "Neg", "Abs", "Sqrt", "Exp", "Log", "Reciprocal", "Floor", "Ceil", "Round", "Cast",
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
}
# What makes a channel group worth pruning by default: a removed channel of a
# purely linear bottleneck is a rank cut of W_next @ W_this, which filter norms
# (or a few calibration pictures) predict badly; MobileNetV2's 16- and
# 320-channel projections are such bottlenecks.
_NONLINEAR = _ELEMENTWISE - {
    "Identity", "Dropout", "Neg", "Cast", "AveragePool", "GlobalAveragePool",
}
# Elementwise with two operands: channel-preserving with a scalar constant,
# a join of two channel spaces with another activation of the same shape.
_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"}


@dataclass
class _Group:
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

    def slices(self, index: _Index) -> list[str]:
        """Initializer names this group would slice."""
        names = []
        for node in [*self.sources, *self.depthwise]:
            names += [n for n in node.input[1:3] if n]
        for node in self.batchnorms:
            names += list(node.input[1:5])
        for node, _ in self.sinks:
            names.append(index.weight(node)[1])
        return names


def _conv_kind(node: onnx.NodeProto, index: _Index) -> str:
    """"conv" (group 1), "depthwise" (multiplier 1), "grouped", or "dynamic" (weight not constant)."""
    if node.input[1] not in index.inits or (len(node.input) > 2 and node.input[2] and node.input[2] not in index.inits):
        return "dynamic"
    group = _attr(node, "group", 1)
    if group == 1:
        return "conv"
    w = index.inits[node.input[1]].dims
    if group == w[0] and w[1] == 1:
        return "depthwise"
    return "grouped"


def _is_scalar_const(index: _Index, name: str) -> bool:
    if not name:
        return True  # an omitted optional input
    value = index.const(name)
    return value is not None and value.size == 1


def _flatten_block(index: _Index, node: onnx.NodeProto) -> int | None:
    """Columns per channel after a ``Flatten(axis=1)`` of a static map (H*W), or None."""
    shape = index.shapes.get(node.input[0])
    if _attr(node, "axis", 1) != 1 or shape is None or len(shape) < 2:
        return None
    if not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        return None
    return math.prod(shape[2:])


def _same_shape(index: _Index, names: Sequence[str]) -> bool:
    shapes = [index.shapes.get(n) for n in names]
    return all(s is not None and None not in s for s in shapes) and len(set(shapes)) == 1  # type: ignore[union-attr]


def _grow(index: _Index, start: str) -> _Group:
    """The channel group of tensor ``start``: walk producers and consumers to a fixpoint."""
    group = _Group()
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
            group.problems.append(f"{node.op_type} {_node_name(node)} has a second output in use")
            return False
        others = [n for i, n in enumerate(node.input) if i not in data_inputs]
        if node.op_type == "PRelu" and not _is_scalar_const(index, node.input[1]):
            group.problems.append(f"PRelu {_node_name(node)} has per-channel slopes")
            return False
        if not all(_is_scalar_const(index, n) for n in others):
            group.problems.append(f"{node.op_type} {_node_name(node)} has a non-scalar operand")
            return False
        return True

    def visit_node(node: onnx.NodeProto, via: str, forward: bool) -> None:
        """``node`` reads (forward) or writes (backward) ``via``, a tensor of the group."""
        op = node.op_type
        name = _node_name(node)
        kind = _conv_kind(node, index) if op == "Conv" else None
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
        elif op in _ELEMENTWISE or (op == "Flatten" and _flatten_block(index, node) is not None):
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
            elif op == "Gemm" and _attr(node, "transA", 0):
                group.problems.append(f"reaches Gemm {name} with transA")
            elif op == "Gemm":
                group.sinks.append((node, "gemm_t" if _attr(node, "transB", 0) else "gemm"))
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
            group.problems.append(f"comes from output {tensor} of {producer.op_type} {_node_name(producer)}")
        for node, _ in index.consumers.get(tensor, []):
            visit_node(node, tensor, forward=True)
    return group


def _find_groups(index: _Index) -> list[_Group]:
    groups: list[_Group] = []
    seen: set[str] = set()
    for node in index.nodes:
        if node.op_type == "Conv" and _conv_kind(node, index) == "conv" and node.output[0] not in seen:
            group = _grow(index, node.output[0])
            seen |= group.tensors
            groups.append(group)
    return groups


def _check_group(index: _Index, group: _Group) -> str | None:
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
        if index.inits[name].data_type not in _FLOAT_TYPES:
            return f"initializer {name} is not floating point"
    return None


def _importance(index: _Index, group: _Group) -> np.ndarray:
    """L1 norm of each channel's filters, summed over sources (each scaled to mean 1)."""
    total = np.zeros(int(index.inits[group.sources[0].input[1]].dims[0]))
    for src in group.sources:
        w = numpy_helper.to_array(index.inits[src.input[1]])
        l1 = np.abs(w.reshape(w.shape[0], -1)).sum(axis=1).astype(np.float64)
        total += l1 / l1.mean() if l1.mean() > 0 else l1
    return total


# --------------------------------------------------------------------------
# Channel pruning: compensating the removed channels' constant part
# --------------------------------------------------------------------------
#
# A removed channel's activation is the response of its filters plus a
# constant (biases, activations of biases, ...). The response is what the L1
# criterion bets is small; the constant is known without data, and dropping it
# shifts every downstream layer (on MobileNetV2, pruning a quarter of one
# expansion without it flipped every top-1 answer on the test photos; with
# it, a third). So the constant each removed channel would have fed a sink
# is folded into that sink's bias: exact when the removed filters are zero
# (up to zero-padding at the borders of 3x3 layers), close when small.

def _unary(op: str, node: onnx.NodeProto, index: _Index):
    """A numpy function for a channel-preserving op applied to constants, or None."""
    def scalar(i: int, attr: str, default: float) -> float:
        if i < len(node.input) and node.input[i]:
            return float(index.const(node.input[i]).reshape(()))
        return float(_attr(node, attr, default))

    def erf(x):
        return np.vectorize(math.erf)(x)

    if op == "Relu":
        return lambda x: np.maximum(x, 0)
    if op == "Clip":
        lo, hi = scalar(1, "min", -np.inf), scalar(2, "max", np.inf)
        return lambda x: np.clip(x, lo, hi)
    if op == "LeakyRelu":
        a = float(_attr(node, "alpha", 0.01))
        return lambda x: np.where(x >= 0, x, a * x)
    if op == "PRelu":
        a = scalar(1, "", 0.0)
        return lambda x: np.where(x >= 0, x, a * x)
    if op == "HardSigmoid":
        a, b = float(_attr(node, "alpha", 0.2)), float(_attr(node, "beta", 0.5))
        return lambda x: np.clip(a * x + b, 0, 1)
    if op == "Elu" or op == "Celu":
        a = float(_attr(node, "alpha", 1.0))
        return lambda x: np.where(x >= 0, x, a * (np.exp(x / a if op == "Celu" else x) - 1))
    if op == "Selu":
        a = float(_attr(node, "alpha", 1.6732632423543772))
        g = float(_attr(node, "gamma", 1.0507009873554805))
        return lambda x: g * np.where(x > 0, x, a * (np.exp(x) - 1))
    if op == "ThresholdedRelu":
        a = float(_attr(node, "alpha", 1.0))
        return lambda x: np.where(x > a, x, 0)
    if op == "Gelu":
        if _attr(node, "approximate", b"none") in (b"tanh", "tanh"):
            return lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        return lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2)))
    if op == "Cast":
        return (lambda x: x) if _attr(node, "to") in _FLOAT_TYPES else None
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


def _constant_activations(index: _Index, group: _Group, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
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
                eps = float(_attr(node, "epsilon", 1e-5))
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


def _sink_delta(kind: str, weight: np.ndarray, const: np.ndarray, removed: np.ndarray) -> np.ndarray | None:
    """What the removed channels' constants added to a sink's ``W @ x`` (before Gemm's alpha), per output."""
    w = weight.astype(np.float64)
    if kind == "conv":
        return w[:, removed].reshape(w.shape[0], len(removed), -1).sum(axis=2) @ const[removed]
    if kind == "gemm_t":
        return w[:, removed] @ const[removed]
    if kind == "gemm":
        return const[removed] @ w[removed, :]
    return None  # MatMul has no bias to fold into


# --------------------------------------------------------------------------
# Channel pruning: least-squares reconstruction from calibration data
# --------------------------------------------------------------------------
#
# With calibration data the choice and the repair are made in the space that
# matters, the sinks' outputs. For a sink that is linear in the pruned
# channels (a 1x1 Conv, a Gemm) with input covariance H and weight W, removing
# channel c and re-fitting the other columns optimally costs
# ||W[:, c]||^2 / [H^-1]_cc (Optimal Brain Surgeon); channels are removed one
# at a time, cheapest first, each removal updating W and H^-1 in closed form,
# and the input mean of the removed channels goes into the bias. The result is
# the least-squares best reconstruction of every sink's output from the kept
# channels on the calibration data: no gradient steps, no labels.

#: Ridge on the input covariance, relative to its mean diagonal.
_DAMPING = 0.01


def _linear_sink(index: _Index, node: onnx.NodeProto, kind: str) -> bool:
    """Whether the sink's output is ``W @ channels + b`` pixel by pixel (1x1 Conv, Gemm)."""
    if kind in ("gemm", "gemm_t"):
        return float(_attr(node, "beta", 1.0)) != 0.0
    if kind != "conv":
        return False
    dims = index.inits[node.input[1]].dims
    pads = _attr(node, "pads", None) or [0]
    return all(d == 1 for d in dims[2:]) and not any(pads) and _attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"VALID", "VALID")


def _stat_tensor(index: _Index, tensor: str) -> str:
    """The tensor whose per-pixel statistics stand for ``tensor``'s.

    A sink behind GlobalAveragePool (+ Flatten) is linear in the pixels
    before the pool, so those pixels are the samples: 49 per picture on
    MobileNetV2's 7x7 map instead of one.
    """
    while (node := index.producer.get(tensor)) is not None and node.op_type in (
        "GlobalAveragePool", "Flatten", "Identity", "Dropout",
    ):
        tensor = node.input[0]
    return tensor


def _feeds(calibration) -> Iterable[dict[str, np.ndarray]]:
    """Input dicts from an ORT-style reader (``get_next()``) or an iterable of dicts."""
    if hasattr(calibration, "get_next"):
        while (feed := calibration.get_next()) is not None:
            yield feed
    else:
        yield from calibration


@dataclass
class _Stats:
    """Mean and covariance of one tensor's channel vector over the calibration pixels."""

    mean: np.ndarray
    cov: np.ndarray


def _session(model: onnx.ModelProto, tensors: Sequence[str], types: dict[str, int]):
    import onnxruntime as ort  # only the calibrated path runs the model

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    del probe.graph.value_info[:]
    # only what the wanted tensors depend on (the inputs stay, feeds name them)
    needed = set(tensors)
    nodes = []
    for node in reversed(probe.graph.node):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(n for n in node.input if n)
            needed |= _subgraph_inputs(node)
    nodes.reverse()
    inits = [init for init in probe.graph.initializer if init.name in needed]
    del probe.graph.node[:]
    probe.graph.node.extend(nodes)
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(inits)
    for name in tensors:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _statistics(
    model: onnx.ModelProto, tensors: Sequence[str], types: dict[str, int],
    feeds: Iterable[dict[str, np.ndarray]], max_rows: int,
) -> dict[str, _Stats]:
    """:class:`_Stats` of each tensor (channel axis 1) over what ``model`` computes from ``feeds``."""
    session = _session(model, tensors, types)
    acc: dict[str, list] = {}  # name -> [sum, gram, rows]
    pending: dict[str, list[np.ndarray]] = defaultdict(list)
    rng = np.random.default_rng(0)

    def flush(name: str) -> None:
        # float32 products over a few thousand pixels at a time (one big
        # product is far faster than many thin ones), float64 sums
        x = np.concatenate(pending.pop(name), axis=1)
        parts = [x.sum(axis=1, dtype=np.float64), (x @ x.T).astype(np.float64), x.shape[1]]
        acc[name] = parts if name not in acc else [a + b for a, b in zip(acc[name], parts)]

    for feed in feeds:
        for name, value in zip(tensors, session.run(list(tensors), feed)):
            x = np.moveaxis(np.asarray(value, np.float32), 1, 0).reshape(value.shape[1], -1)
            if x.shape[1] > max_rows:  # big early maps: a random subset of pixels is plenty
                x = x[:, np.sort(rng.choice(x.shape[1], max_rows, replace=False))]
            pending[name].append(x)
            if sum(b.shape[1] for b in pending[name]) >= 4096:
                flush(name)
    for name in list(pending):
        flush(name)
    stats = {}
    for name, (total, gram, rows) in acc.items():
        mean = total / rows
        stats[name] = _Stats(mean, gram / rows - np.outer(mean, mean))
    return stats


def _damped_inverse(cov: np.ndarray) -> np.ndarray:
    damp = _DAMPING * max(float(np.mean(np.diag(cov))), 1e-12)
    return np.linalg.inv(cov + damp * np.eye(len(cov)))


def _obs_select(weights: list[np.ndarray], covs: list[np.ndarray], n_remove: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Remove ``n_remove`` input channels shared by linear layers ``weights`` ([out, C] each).

    Returns the kept channel indices and the re-fitted weights (full width,
    removed columns zero) minimizing each layer's output error under its
    input covariance.
    """
    weights = [w.astype(np.float64).copy() for w in weights]
    hinvs = [_damped_inverse(cov) for cov in covs]
    alive = np.ones(len(covs[0]), bool)
    for _ in range(n_remove):
        cost = np.zeros(len(alive))
        for w, h in zip(weights, hinvs):
            cost[alive] += (w[:, alive] ** 2).sum(axis=0) / np.diag(h)[alive]
        cost[~alive] = np.inf
        c = int(np.argmin(cost))
        for w, h in zip(weights, hinvs):
            w -= np.outer(w[:, c], h[c]) / h[c, c]
            h -= np.outer(h[:, c], h[c]) / h[c, c]
            w[:, c] = 0.0
        alive[c] = False
    return np.flatnonzero(alive), weights


def _as_matrix(weight: np.ndarray, kind: str) -> np.ndarray:
    """A sink's weight as [out, channels]."""
    if kind == "conv":
        return weight.reshape(weight.shape[0], weight.shape[1])
    return weight if kind == "gemm_t" else weight.T


def _from_matrix(matrix: np.ndarray, kind: str, like: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return matrix.reshape(like.shape).astype(like.dtype)
    return (matrix if kind == "gemm_t" else matrix.T).astype(like.dtype)


# --------------------------------------------------------------------------
# Channel pruning: the pass
# --------------------------------------------------------------------------

def prune_channels(
    model: onnx.ModelProto,
    ratio: float,
    *,
    min_channels: int = 8,
    channel_multiple: int = 1,
    prune_residual: bool = False,
    prune_linear: bool = False,
    calibration=None,
    max_rows_per_sample: int = 512,
) -> PruneReport:
    """Remove a fraction ``ratio`` of the output channels of convolutions, in place.

    For every channel group (see the module docstring) with ``C`` channels,
    ``floor(ratio * C)`` channels are removed, but at least ``min_channels``
    are kept and the kept count is rounded up to a multiple of
    ``channel_multiple`` (SIMD-friendly widths); a group where that leaves
    nothing to remove is reported as skipped. Residual groups (joined by an
    ``Add``) are pruned only with ``prune_residual=True``, linear bottlenecks
    (no activation between the layers) only with ``prune_linear=True``.

    Which channels, and how the loss is repaired, depends on ``calibration``:

    * ``None`` (data-free): the channels whose filters have the smallest L1
      norm go, and the constant part of each removed channel (its bias,
      carried through the activations, BatchNorm and depthwise layers on the
      way) is folded into the bias of the layers that read it.
    * an ORT ``CalibrationDataReader`` (anything with ``get_next()``) or an
      iterable of input dicts: for groups whose readers are all 1x1 Conv or
      Gemm, the channels are chosen and the readers' weights and biases
      re-fitted by least squares on the data (Optimal Brain Surgeon on the
      readers' input covariance, with the removed channels' mean folded into
      the bias); other groups fall back to the data-free rule. This runs the
      model once over the data with ONNX Runtime (imported only here) and
      consumes the reader. ``max_rows_per_sample`` caps the pixels per input
      and tensor that enter the statistics.

    Each :class:`ChannelGroup` in the report says which rule it got.

    The result passes ``onnx.checker`` (full check) and strict shape
    inference, and its ``value_info`` is the inferred one; graph inputs and
    outputs are unchanged. Data-free, removing channels whose filters are
    all zero leaves the output as it was, bar float rounding and, where a
    removed channel carries a nonzero constant through a padded 3x3 layer,
    the borders of that layer's map; with calibration data too (a zero
    filter gives a channel of zero variance, removed first at no cost) — the
    tests build on that.

    Raises :class:`QuantizeInputError` for arguments out of range or empty
    calibration data, and :class:`QuantizeError` if the result does not
    check (a bug here).
    """
    _check_fraction("channel prune ratio", ratio)
    if min_channels < 1 or channel_multiple < 1:
        raise QuantizeInputError("min_channels and channel_multiple must be at least 1")
    index = _Index(model, shapes=True)
    total_before, nonzero_before = count_params(model)
    report = PruneReport("channels", float(ratio), total_before, total_before, nonzero_before, nonzero_before)

    # 1. Which groups, how many channels each.
    planned: list[tuple[_Group, int, int]] = []
    for group in _find_groups(index):
        label = ", ".join(_node_name(s) for s in group.sources) or "?"
        why = _check_group(index, group)
        if why is None and group.joins and not prune_residual:
            why = f"joined by {group.joins[0].op_type} {_node_name(group.joins[0])} (residual); prune_residual=True prunes it"
        if why is None and not prune_linear and not any(n.op_type in _NONLINEAR for n in group.chain):
            why = "linear bottleneck (no activation between this layer and the next); prune_linear=True prunes it"
        if why is None and not group.sinks:
            why = "no layer reads these channels"
        if why is not None:
            report.skipped.append(SkippedLayer(label, "Conv", why))
            continue
        channels = int(index.inits[group.sources[0].input[1]].dims[0])
        keep_n = channels - int(math.floor(ratio * channels + 1e-9))
        keep_n = max(keep_n, min(channels, min_channels))
        keep_n = min(channels, int(math.ceil(keep_n / channel_multiple) * channel_multiple))
        if keep_n >= channels:
            report.skipped.append(SkippedLayer(
                label, "Conv", f"{channels} channels: nothing to remove with min_channels={min_channels}"
                + (f", channel_multiple={channel_multiple}" if channel_multiple > 1 else ""),
            ))
            continue
        planned.append((group, channels, keep_n))

    stats: dict[str, _Stats] = {}
    if calibration is not None:
        feeds = list(_feeds(calibration))
        if not feeds:
            raise QuantizeInputError("channel pruning: the calibration data is empty")
        wanted = list(dict.fromkeys(
            _stat_tensor(index, n.input[0])
            for g, _, _ in planned
            if all(_linear_sink(index, n, k) and g.block[n.input[0]] == 1 for n, k in g.sinks)
            for n, _ in g.sinks
        ))
        if wanted:
            stats = _statistics(model, wanted, index.types, feeds, max_rows_per_sample)

    # 2. Choose the channels and repair the sinks, on full-width arrays.
    before = {name: numpy_helper.to_array(init) for name, init in index.inits.items()}
    arrays = dict(before)
    taken = {n for node in index.nodes for n in [*node.input, *node.output]} | set(index.inits)
    plans: list[tuple[_Group, np.ndarray]] = []
    for group, channels, keep_n in planned:
        deltas: dict[int, np.ndarray] = {}
        sink_stats = [stats.get(_stat_tensor(index, n.input[0])) for n, _ in group.sinks]
        if stats and all(st is not None for st in sink_stats):
            rule = "least_squares"
            mats = [_as_matrix(arrays[index.weight(n)[1]], k) for n, k in group.sinks]
            keep, fitted = _obs_select(mats, [st.cov for st in sink_stats], channels - keep_n)
            for (node, kind), old, new, st in zip(group.sinks, mats, fitted, sink_stats):
                wname = index.weight(node)[1]
                arrays[wname] = _from_matrix(new, kind, arrays[wname])
                deltas[id(node)] = (old.astype(np.float64) - new) @ st.mean
        else:
            rule = "l1"
            keep = np.sort(np.argsort(-_importance(index, group), kind="stable")[:keep_n])
            removed = np.setdiff1d(np.arange(channels), keep)
            values = _constant_activations(index, group, arrays)
            if values is not None:
                for node, kind in group.sinks:
                    b = group.block[node.input[0]]
                    const = np.repeat(values[node.input[0]], b)
                    delta = _sink_delta(kind, arrays[index.weight(node)[1]], const, _columns(removed, b))
                    if delta is not None:
                        deltas[id(node)] = delta
                        rule = "l1+constant"
        for node, kind in group.sinks:
            if id(node) not in deltas:
                continue
            delta = deltas[id(node)]
            if kind in ("gemm", "gemm_t"):
                beta = float(_attr(node, "beta", 1.0))
                if beta == 0:
                    continue
                delta = delta * float(_attr(node, "alpha", 1.0)) / beta
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
            if bias:
                arrays[bias] = (arrays[bias] + delta).astype(before[bias].dtype)
            else:
                _add_bias(model, index, node, delta.astype(before[node.input[1]].dtype), taken, arrays, before)
        plans.append((group, keep))
        report.groups.append(ChannelGroup(
            tuple(_node_name(s) for s in group.sources),
            tuple(_node_name(n) for n, _ in group.sinks),
            channels, keep_n, bool(group.joins), rule,
        ))

    # 3. Slice.
    changed: dict[str, onnx.NodeProto] = {}  # weight name -> its node
    for group, keep in plans:
        for node in [*group.sources, *group.depthwise]:
            for name in node.input[1:3]:
                if name:
                    arrays[name] = arrays[name][keep]
            changed[node.input[1]] = node
        for node in group.depthwise:
            for a in node.attribute:
                if a.name == "group":
                    a.i = len(keep)
        for node in group.batchnorms:
            for name in node.input[1:5]:
                arrays[name] = arrays[name][keep]
        for node, kind in group.sinks:
            wname = index.weight(node)[1]
            cols = _columns(keep, group.block[node.input[0]])
            arrays[wname] = np.take(arrays[wname], cols, axis=1 if kind in ("conv", "gemm_t") else 0)
            changed[wname] = node

    for name, array in arrays.items():
        if array is not before[name]:
            _replace_initializer(index, name, array)

    position = {id(node): i for i, node in enumerate(index.nodes)}
    for wname, node in sorted(changed.items(), key=lambda kv: position[id(kv[1])]):
        b, a = _sizes([before[wname]]), _sizes([arrays[wname]])
        report.layers.append(LayerPrune(
            _node_name(node), node.op_type, wname, tuple(before[wname].shape), tuple(arrays[wname].shape),
            b[0], a[0], b[1], a[1],
        ))

    _reinfer(model)
    report.params_after, report.nonzero_after = count_params(model)
    return report


def _columns(channels: np.ndarray, block: int) -> np.ndarray:
    """The input columns of channels laid out ``block`` consecutive elements each (Flatten of an HxW map)."""
    return (np.asarray(channels)[:, None] * block + np.arange(block)).ravel()


def _add_bias(
    model: onnx.ModelProto, index: _Index, node: onnx.NodeProto, bias: np.ndarray,
    taken: set[str], arrays: dict[str, np.ndarray], before: dict[str, np.ndarray],
) -> None:
    """Give a Conv/Gemm without a bias the bias ``bias`` (a new initializer, recorded as empty before)."""
    name, i = f"{node.input[1]}_pruned_bias", 1
    while name in taken:
        name, i = f"{node.input[1]}_pruned_bias_{i}", i + 1
    taken.add(name)
    model.graph.initializer.append(numpy_helper.from_array(bias, name))
    index.inits[name] = model.graph.initializer[-1]
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name
    arrays[name], before[name] = bias, np.zeros(0, bias.dtype)


def _reinfer(model: onnx.ModelProto) -> None:
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
    index = _Index(model, shapes=True)
    dims = {name: tuple(init.dims) for name, init in index.inits.items()}
    for node in index.nodes:
        x = index.shapes.get(node.input[0]) if node.input else None
        width = x[1] if x is not None and len(x) > 1 and isinstance(x[1], int) else None
        name = f"{node.op_type} {_node_name(node)}"
        if node.op_type == "Conv" and node.input[1] in dims:
            w = dims[node.input[1]]
            if width is not None and width != w[1] * _attr(node, "group", 1):
                return f"{name} reads {width} channels, its weight {list(w)} with group {_attr(node, 'group', 1)}"
            if len(node.input) > 2 and node.input[2] in dims and dims[node.input[2]] != (w[0],):
                return f"{name} has {w[0]} filters and a bias of shape {list(dims[node.input[2]])}"
        elif node.op_type == "BatchNormalization" and width is not None:
            for p in node.input[1:5]:
                if p in dims and dims[p] != (width,):
                    return f"{name} reads {width} channels, its {p} has shape {list(dims[p])}"
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in dims and x:
            w = dims[node.input[1]]
            k = x[0] if node.op_type == "Gemm" and _attr(node, "transA", 0) else x[-1]
            wk = w[-1] if node.op_type == "Gemm" and _attr(node, "transB", 0) else w[0 if len(w) == 1 else -2]
            if isinstance(k, int) and k != wk:
                return f"{name} reads {k} features, its weight has shape {list(w)}"
    return None
