"""Per-channel range equalization of linear streams (exact, before quantizing).

int8 activations have one scale per tensor. Where a few channels of a tensor
are much wider than the rest (MobileNetV2's features.16 sum on the
calibration photos: the widest channels reach 20-34, the median channel
6.7), the wide channels set the step and the others are rounded coarsely.

A *linear stream* is a set of tensors joined by ``Add`` nodes (a residual
stage: the projection convolutions' outputs and the running sums), or a
single convolution output with no activation, where every tensor is written
by a Conv (with constant weights and bias) or by one of the stream's Adds,
and read only by the stream's Adds or by ordinary (``group=1``) Convs.
Dividing channel ``c`` of every tensor of such a stream by ``s_c`` (scaling
output channel ``c`` of the writing convolutions' weights and bias by
``1/s_c``) and multiplying input channel ``c`` of the reading convolutions'
weights by ``s_c`` leaves the fp32 model's function unchanged (up to float
rounding), because nothing between them is non-linear.

``s_c = max(1, (r_c / median(r)) ** 0.5)`` with ``r_c`` the channel's
largest magnitude on the calibration data: only the wide channels shrink,
by the square root of how much wider they are than the median channel, so
that the readers' weights (quantized per output channel) grow by no more
than that: the cross-layer equalization compromise between activation and
weight ranges. Deterministic.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stream:
    tensors: tuple[str, ...]
    writers: tuple[str, ...]  # Conv nodes (names) writing stream tensors
    readers: tuple[str, ...]  # Conv nodes (names) reading stream tensors


def find_streams(model: onnx.ModelProto) -> list[Stream]:
    """Every linear stream of the model that can be rescaled exactly."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_io = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    order: list[str] = []
    for node in model.graph.node:
        if node.op_type == "Add" and len(node.input) == 2 and not any(i in inits for i in node.input):
            for name in node.input:
                order.append(name)
                parent[find(name)] = find(node.output[0])
            order.append(node.output[0])
        elif node.op_type == "Conv":
            order.append(node.output[0])
            find(node.output[0])
    groups: dict[str, list[str]] = {}
    for name in dict.fromkeys(order):
        groups.setdefault(find(name), []).append(name)

    def attr(node: onnx.NodeProto, key: str, default: int) -> int:
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == key), default)

    streams = []
    for tensors in groups.values():
        members = set(tensors)
        writers: list[str] = []
        conv_readers: list[str] = []
        ok = True
        channels = set()
        for t in tensors:
            node = producer.get(t)
            if t in graph_io or node is None:
                ok = False
                break
            if node.op_type == "Conv":
                if (
                    len(node.input) < 3
                    or node.input[1] not in inits
                    or node.input[2] not in inits
                    or uses[node.input[1]] > 1
                    or uses[node.input[2]] > 1
                ):
                    ok = False
                    break
                writers.append(node.name)
                channels.add(inits[node.input[1]].dims[0])
            elif not (node.op_type == "Add" and node.output[0] in members):
                ok = False
                break
            for reader in readers.get(t, []):
                if reader.op_type == "Add" and reader.output[0] in members:
                    continue
                if (
                    reader.op_type == "Conv"
                    and reader.input[0] == t
                    and reader.input[1] in inits
                    and uses[reader.input[1]] == 1
                    and attr(reader, "group", 1) == 1
                ):
                    conv_readers.append(reader.name)
                    channels.add(inits[reader.input[1]].dims[1])
                else:
                    ok = False
                    break
            if not ok:
                break
        if ok and writers and conv_readers and len(channels) == 1:
            streams.append(Stream(tuple(tensors), tuple(dict.fromkeys(writers)), tuple(dict.fromkeys(conv_readers))))
    return streams


def channel_absmax(
    model: onnx.ModelProto, tensors: list[str], batches: Iterable[Mapping[str, np.ndarray]], *, threads: int = 2
) -> dict[str, np.ndarray]:
    """Largest |value| of every channel (axis 1) of ``tensors``."""
    import onnxruntime as ort

    m = copy.deepcopy(model)
    del m.graph.output[:]
    m.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    result: dict[str, np.ndarray] = {}
    for feed in batches:
        for t, v in zip(tensors, session.run(tensors, dict(feed))):
            axes = tuple(i for i in range(v.ndim) if i != 1)
            m_ = np.abs(v).max(axis=axes)
            result[t] = np.maximum(result[t], m_) if t in result else m_
    return result


def equalize(
    model: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    alpha: float = 0.5,
) -> tuple[onnx.ModelProto, list[dict]]:
    """A copy of ``model`` with every linear stream's wide channels scaled
    down (see the module doc), and what was done per stream."""
    model = copy.deepcopy(model)
    streams = find_streams(model)
    if not streams:
        return model, []
    ranges = channel_absmax(model, [t for s in streams for t in s.tensors], batches)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    done = []
    for stream in streams:
        r = np.max([ranges[t] for t in stream.tensors], axis=0).astype(np.float64)
        ref = float(np.median(r))
        if ref <= 0:
            continue
        s = np.maximum(1.0, (r / ref) ** alpha)
        if np.all(s == 1.0):
            continue
        for name in stream.writers:
            node = nodes[name]
            for k, shape in ((1, (-1,) + (1,) * (len(inits[node.input[1]].dims) - 1)), (2, (-1,))):
                init = inits[node.input[k]]
                value = numpy_helper.to_array(init).astype(np.float64) / s.reshape(shape)
                init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
        for name in stream.readers:
            init = inits[nodes[name].input[1]]
            shape = (1, -1) + (1,) * (len(init.dims) - 2)
            value = numpy_helper.to_array(init).astype(np.float64) * s.reshape(shape)
            init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
        done.append({"tensors": len(stream.tensors), "channels": int(len(s)), "max_scale": round(float(s.max()), 2)})
    return model, done
