"""Put parts of a QDQ model back into float, without re-quantizing.

A QDQ model (ONNX Runtime's static quantization) marks every quantized
tensor with a QuantizeLinear -> DequantizeLinear pair, and every quantized
weight with a DequantizeLinear of an int8 initializer. Removing a pair (and
feeding the consumers the float tensor, or the original float weights) keeps
exactly that tensor in float; ONNX Runtime then runs the neighbouring nodes
with float kernels. This makes a mixed-precision candidate in milliseconds,
where re-running the quantizer takes seconds.

Candidates:
* ``act:<tensor>``: one quantized activation (all its Q/DQ nodes);
* ``weights:<node>``: the quantized initializers (weights, bias) of one node.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass

import onnx

QUANTIZED_SUFFIX = "_quantized"


@dataclass(frozen=True)
class Candidate:
    id: str
    kind: str  # "activation" | "weights"
    consumers: tuple[str, ...]  # names of the nodes that read it


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
        self.candidates: list[Candidate] = []
        for tensor, (q, *dqs) in self._acts.items():
            users = tuple(sorted({u.name for dq in dqs for u in consumers[dq.output[0]]}))
            self.candidates.append(Candidate(f"act:{tensor}", "activation", users))
        for node_name in self._weights:
            self.candidates.append(Candidate(f"weights:{node_name}", "weights", (node_name,)))
        self._by_id = {c.id: c for c in self.candidates}

    def with_float(self, ids: list[str] | tuple[str, ...]) -> onnx.ModelProto:
        """The model with the candidates ``ids`` in float. A node whose
        activation input goes back to float also gets its float weights: a
        float node reading DequantizeLinear(int8 weights) would dequantize
        them on every inference (ONNX Runtime does not fold DQ nodes)."""
        ids = list(ids)
        for cid in list(ids):
            cand = self._by_id.get(cid)
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
        used = {name for n in kept for name in n.input} | {o.name for o in model.graph.output}
        live = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(live)
        return model
