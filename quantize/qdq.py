"""Put parts of a QDQ model back into float, without re-quantizing.

A QDQ model (ONNX Runtime's static quantization) marks every quantized
tensor with a QuantizeLinear -> DequantizeLinear pair, and every quantized
weight with a DequantizeLinear of an int8 initializer. Removing a pair (and
feeding the consumers the float tensor, or the original float weights) keeps
exactly that tensor in float; ONNX Runtime then runs the neighbouring nodes
with float kernels. This makes a mixed-precision candidate in milliseconds,
where re-running the quantizer takes seconds.

Candidates:
* ``act:<tensor>``: one quantized activation (all its Q/DQ nodes); the
  input and output of an op that passes values on (Relu, Clip, Flatten,
  Reshape, ...) quantized with the same scale and zero point (ONNX Runtime
  gives both one range) are one candidate, named after the output: putting
  only one of them back into float changes nothing, the other still rounds
  the values;
* ``weights:<node>``: the quantized initializers (weights, bias) of one node.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx

QUANTIZED_SUFFIX = "_quantized"
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
"""Ops whose weights the quantizer stores as int8 (and whose MACs count)."""
# Ops that pass int8 values on unchanged (ONNX Runtime gives their input and
# output the same scale and zero point; Relu/Clip only clamp to the range).
PASS_THROUGH_OPS = ("Relu", "Clip", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Identity")


@dataclass(frozen=True)
class Candidate:
    id: str
    kind: str  # "activation" | "weights"
    consumers: tuple[str, ...]  # names of the nodes that read it
    members: tuple[str, ...] = ()  # further ``act:`` tensors that go to float with it


class QdqEditor:
    """Holds one QDQ model and the fp32 model it came from (for the float
    weights). ``with_float(ids)`` returns a new model; both inputs stay as
    they are. Not thread-safe."""

    def __init__(self, qdq: onnx.ModelProto, fp32: onnx.ModelProto) -> None:
        self.qdq = qdq
        self.float_weights = {i.name: i for i in fp32.graph.initializer}
        inits = {i.name for i in qdq.graph.initializer}
        consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in qdq.graph.node:
            for name in node.input:
                consumers[name].append(node)
        self._acts: dict[str, list[onnx.NodeProto]] = {}  # tensor -> [Q, DQ...]
        self._weights: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # node -> [DQ of initializers]
        for node in qdq.graph.node:
            if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
                dqs = [c for c in consumers[node.output[0]] if c.op_type == "DequantizeLinear"]
                if dqs:
                    self._acts[node.input[0]] = [node, *dqs]
            elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
                original = node.input[0].removesuffix(QUANTIZED_SUFFIX)
                if original in self.float_weights:
                    for user in consumers[node.output[0]]:
                        self._weights[user.name].append(node)
        # A Relu/Clip whose input and output carry the same quantization: one candidate.
        init_values = {i.name: i for i in qdq.graph.initializer}

        def params(q: onnx.NodeProto) -> tuple[object, ...]:
            out: list[object] = []
            for name in q.input[1:]:
                if name in init_values:
                    value = onnx.numpy_helper.to_array(init_values[name])
                    out.append((value.dtype.str, value.shape, value.tobytes()))
                else:
                    out.append(name)
            return tuple(out)

        folded: dict[str, str] = {}  # input -> output of an op that passes the quantized values on
        for tensor, (q, *dqs) in self._acts.items():
            readers = [u for dq in dqs for u in consumers[dq.output[0]]]
            if len(readers) == 1 and readers[0].op_type in PASS_THROUGH_OPS and readers[0].output[0] in self._acts:
                out = readers[0].output[0]
                if params(self._acts[out][0]) == params(q):
                    folded[tensor] = out

        def root(tensor: str) -> str:
            seen = {tensor}
            while tensor in folded and folded[tensor] not in seen:
                tensor = folded[tensor]
                seen.add(tensor)
            return tensor

        members: dict[str, list[str]] = defaultdict(list)
        for tensor in folded:
            members[root(tensor)].append(tensor)
        self.candidates: list[Candidate] = []
        for tensor, (q, *dqs) in self._acts.items():
            if tensor in folded and root(tensor) != tensor:
                continue
            group = [tensor, *members.get(tensor, [])]
            users = tuple(sorted({u.name for t in group for dq in self._acts[t][1:] for u in consumers[dq.output[0]]}))
            self.candidates.append(
                Candidate(f"act:{tensor}", "activation", users, tuple(f"act:{t}" for t in group[1:]))
            )
        for node_name in self._weights:
            self.candidates.append(Candidate(f"weights:{node_name}", "weights", (node_name,)))
        self._by_id = {c.id: c for c in self.candidates}
        self._producer = {o: n.name for n in qdq.graph.node for o in n.output}

    def float_compute(self, cid: str) -> set[str]:
        """The nodes that run in float when candidate ``cid`` is in float:
        the nodes reading the tensor(s) and the nodes writing them (a node
        whose output is no longer quantized cannot use an integer kernel),
        or, for weights, the node itself."""
        cand = self._by_id[cid]
        if cand.kind == "weights":
            return set(cand.consumers)
        names = set(cand.consumers)
        for member in (cid, *cand.members):
            producer = self._producer.get(member.partition(":")[2])
            if producer:
                names.add(producer)
        return names

    def with_float(self, ids: list[str] | tuple[str, ...]) -> onnx.ModelProto:
        """The model with the candidates ``ids`` in float. A node whose
        activation input goes back to float also gets its float weights: a
        float node reading DequantizeLinear(int8 weights) would dequantize
        them on every inference (ONNX Runtime does not fold DQ nodes)."""
        ids = list(ids)
        for cid in list(ids):
            cand = self._by_id.get(cid)
            if cand is not None:
                ids += list(cand.members)
            if cand is not None and cand.kind == "activation":
                ids += [f"weights:{c}" for c in cand.consumers if c in self._weights]
        ids = list(dict.fromkeys(ids))
        model = copy.deepcopy(self.qdq)
        rename: dict[str, str] = {}
        drop: set[str] = set()
        add_inits: dict[str, onnx.TensorProto] = {}
        for cid in ids:
            kind, _, key = cid.partition(":")
            if kind == "act":
                q, *dqs = self._acts[key]
                drop.add(q.name)
                for dq in dqs:
                    drop.add(dq.name)
                    rename[dq.output[0]] = key
            elif kind == "weights":
                for dq in self._weights[key]:
                    original = dq.input[0].removesuffix(QUANTIZED_SUFFIX)
                    weight = copy.deepcopy(self.float_weights[original])
                    weight.name = dq.output[0]  # consumers keep reading the same name
                    add_inits[weight.name] = weight
                    drop.add(dq.name)
            else:
                raise KeyError(cid)
        kept = [n for n in model.graph.node if n.name not in drop]
        for node in kept:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
        for out in model.graph.output:
            if out.name in rename:  # a graph output behind a Q/DQ pair
                out.name = rename[out.name]
        del model.graph.node[:]
        model.graph.node.extend(kept)
        model.graph.initializer.extend(add_inits.values())
        _drop_unused_initializers(model)
        return model


def _prune_dead(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads, and unused initializers."""
    nodes = list(model.graph.node)
    outputs = {o.name for o in model.graph.output}
    while True:
        used = {name for n in nodes for name in n.input} | outputs
        kept = [n for n in nodes if any(o in used for o in n.output)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for n in model.graph.node for name in n.input} | {o.name for o in model.graph.output}
    live = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(live)


def float_residuals(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Keep the residual stream in float: an ``Add`` that reads another
    ``Add``'s output through a QuantizeLinear/DequantizeLinear pair reads
    the float tensor instead. The pair stays for the other readers (the
    next block's convolution keeps its int8 input), so every Conv/Gemm stays
    integer; only the cheap elementwise Adds run in float, and the rounding
    error no longer piles up along the skip connections. Returns a new
    model and the number of Add inputs changed."""
    model = copy.deepcopy(model)
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Add":
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in inits:
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            source = producer.get(q.input[0])
            if source is not None and source.op_type == "Add":
                node.input[i] = q.input[0]
                changed += 1
    if changed:
        _prune_dead(model)
    return model, changed


def float_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Graph outputs come out of their last node in float instead of through
    a QuantizeLinear/DequantizeLinear pair: nothing int8 reads them, and
    rounding a classifier's logits to 256 levels (one step about 0.1 on
    MobileNetV2) makes near ties exact ties. Returns a new model and the
    number of outputs changed."""
    model = copy.deepcopy(model)
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        for name in node.input:
            readers[name] += 1
    changed = 0
    for out in model.graph.output:
        dq = producer.get(out.name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in inits or readers[out.name]:
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or readers[q.output[0]] != 1:
            continue
        source = producer.get(q.input[0])
        if source is None or readers[q.input[0]] != 1:
            continue
        source.output[list(source.output).index(q.input[0])] = out.name
        dq.output[0] = f"{out.name}__unused"
        changed += 1
    if changed:
        _prune_dead(model)
    return model, changed


def compact(model: onnx.ModelProto, keep_names: set[str] | frozenset[str] = frozenset()) -> onnx.ModelProto:
    """The same model in fewer bytes (a QDQ model's bookkeeping is about 6 %
    of its file): zero points of int8 weights and int32 biases that are all
    zero are dropped (0 is DequantizeLinear's default), value_info is dropped
    (ONNX Runtime infers shapes when it loads the model), QuantizeLinear /
    DequantizeLinear nodes lose their names, and the tensors the quantizer
    named (``..._quantized``, ``..._scale``, ``..._DequantizeLinear_Output``
    ...) get short ones. Tensors named in ``keep_names`` (give the fp32
    model's tensor names), graph inputs and outputs keep their names.
    Returns a new model; numerically identical."""
    model = copy.deepcopy(model)
    inits = {i.name: i for i in model.graph.initializer}
    zero_ok = {onnx.TensorProto.INT8, onnx.TensorProto.INT32}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or not node.input[2]:
            continue
        x, zp = inits.get(node.input[0]), inits.get(node.input[2])
        if x is None or zp is None or x.data_type not in zero_ok or zp.data_type != x.data_type:
            continue
        if not onnx.numpy_helper.to_array(zp).any():
            del node.input[2]
    _prune_dead(model)
    del model.graph.value_info[:]
    protected = set(keep_names) | {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in protected:
            return name
        if name not in short:
            short[name] = f"q{len(short)}"
        return short[name]

    for node in model.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename(name)
        for i, name in enumerate(node.output):
            node.output[i] = rename(name)
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            node.name = ""
    for init in model.graph.initializer:
        init.name = rename(init.name)
    return model


def node_macs(model: onnx.ModelProto) -> dict[str, float]:
    """Multiply-accumulates of every Conv/Gemm/MatMul node (by node name),
    from the shapes ONNX shape inference finds (batch 1 for a static
    input). Nodes whose shapes are unknown count 0."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an exotic op: fall back to what the model says
        inferred = model
    shapes: dict[str, list[int]] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    macs: dict[str, float] = {}
    for node in inferred.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        w, y = shapes.get(node.input[1], []), shapes.get(node.output[0], [])
        if not w or not y or 0 in w or 0 in y:
            macs[node.name] = 0.0
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            out = float(np.prod(y))
            macs[node.name] = out * float(np.prod(w[1:]))  # per output value: Cin/group * kernel
        else:
            k = w[1] if node.op_type == "Gemm" and _trans_b(node) else w[-2] if len(w) > 1 else w[0]
            macs[node.name] = float(np.prod(y)) * float(k)
    return macs


def _trans_b(node: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)
