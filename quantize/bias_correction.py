"""Empirical bias correction for a QDQ model.

Rounding weights to int8 and activations to uint8 does not only add noise:
it shifts the *mean* of every convolution's output channels a little, and
those shifts add up through the network (on MobileNetV2 the fully quantized
model's logits drift away from fp32's even where each layer looks fine).
Bias correction measures, on the calibration pictures, the mean error each
quantized layer makes on its own and folds the opposite into the layer's
bias, which costs nothing at inference time.

For every Conv/Gemm whose weights the QDQ model quantizes, a *shadow* copy
is added to the fp32 graph: it reads the same fp32 input, quantized and
dequantized with the QDQ model's scale and zero point, and the QDQ model's
int8 weights; the per-channel mean of ``fp32 output - shadow output`` over
the calibration data is that layer's correction. Each layer is corrected for
its own error given the fp32 input ("local" correction): correcting every
layer at once for the error it *receives* as well would count an upstream
shift once in the upstream layer and again downstream (measured on
MobileNetV2: that diverges), and correcting layer by layer in order needs a
pass per layer. One ONNX Runtime pass over the calibration data is enough.

The corrected fp32 model is then quantized again with the same activation
ranges; only the int32 biases change. Deterministic.
"""

from __future__ import annotations

import copy
import logging
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantize.qdq import QUANTIZED_SUFFIX

log = logging.getLogger(__name__)


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def quantization_params(qdq: onnx.ModelProto) -> tuple[dict[str, tuple[str, str]], dict[str, onnx.NodeProto]]:
    """From a QDQ model: activation tensor -> (scale, zero point) initializer
    names of its QuantizeLinear, and fp32 weight name -> the
    DequantizeLinear node of its int8 version."""
    inits = _initializers(qdq)
    acts: dict[str, tuple[str, str]] = {}
    weights: dict[str, onnx.NodeProto] = {}
    for node in qdq.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits and len(node.input) > 2:
            acts.setdefault(node.input[0], (node.input[1], node.input[2]))
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits and node.input[0].endswith(QUANTIZED_SUFFIX):
            weights[node.input[0].removesuffix(QUANTIZED_SUFFIX)] = node
    return acts, weights


def shadow_model(fp32: onnx.ModelProto, qdq: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The fp32 model with, for every quantized Conv/Gemm that has a bias, an
    extra output: the per-channel mean of (fp32 output - output computed
    from the quantized input and int8 weights). Returns the model and
    {bias initializer name: output name}."""
    model = copy.deepcopy(fp32)
    fp_inits = _initializers(model)
    q_inits = _initializers(qdq)
    acts, weights = quantization_params(qdq)
    opset = _opset(model)
    new_nodes: list[onnx.NodeProto] = []
    new_inits: dict[str, onnx.TensorProto] = {}
    outputs: dict[str, str] = {}

    def take(name: str) -> str:
        if name not in new_inits:
            t = copy.deepcopy(q_inits[name])
            t.name = f"bc/{name}"
            new_inits[name] = t
        return new_inits[name].name

    for k, node in enumerate(fp32.graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in fp_inits:
            continue
        wname = node.input[1]
        if wname not in weights:
            continue
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                continue
        x = node.input[0]
        if x in acts:
            scale, zp = acts[x]
            new_nodes.append(helper.make_node("QuantizeLinear", [x, take(scale), take(zp)], [f"bc/{k}/xq"]))
            new_nodes.append(helper.make_node("DequantizeLinear", [f"bc/{k}/xq", take(scale), take(zp)], [f"bc/{k}/x"]))
            x = f"bc/{k}/x"
        dq = weights[wname]
        new_nodes.append(
            helper.make_node("DequantizeLinear", [take(i) for i in dq.input], [f"bc/{k}/w"], name=f"bc/{k}/wdq")
        )
        new_nodes[-1].attribute.extend(copy.deepcopy(list(dq.attribute)))
        shadow = copy.deepcopy(node)
        shadow.name = f"bc/{k}/op"
        shadow.input[0], shadow.input[1] = x, f"bc/{k}/w"
        del shadow.output[:]
        shadow.output.append(f"bc/{k}/y")
        new_nodes.append(shadow)
        new_nodes.append(helper.make_node("Sub", [node.output[0], f"bc/{k}/y"], [f"bc/{k}/d"]))
        # Conv output: N, C, spatial... (the weight's rank); Gemm: N, C
        axes = [0] + list(range(2, len(fp_inits[wname].dims))) if node.op_type == "Conv" else [0]
        if opset >= 18:
            axes_name = f"bc/{k}/axes"
            new_inits[axes_name] = numpy_helper.from_array(np.asarray(axes, np.int64), axes_name)
            new_nodes.append(helper.make_node("ReduceMean", [f"bc/{k}/d", axes_name], [f"bc/{k}/mean"], keepdims=0))
        else:
            new_nodes.append(helper.make_node("ReduceMean", [f"bc/{k}/d"], [f"bc/{k}/mean"], axes=axes, keepdims=0))
        outputs[node.input[2]] = f"bc/{k}/mean"
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(new_inits.values())
    del model.graph.output[:]
    model.graph.output.extend(helper.make_empty_tensor_value_info(o) for o in outputs.values())
    return model, outputs


def bias_deltas(
    fp32: onnx.ModelProto,
    qdq: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    threads: int = 2,
) -> dict[str, np.ndarray]:
    """{bias initializer name: correction to add} measured on ``batches``
    (ORT feed dicts of the fp32 model's input)."""
    import onnxruntime as ort

    model, outputs = shadow_model(fp32, qdq)
    if not outputs:
        return {}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = list(outputs)
    order = [outputs[n] for n in names]
    sums = [np.zeros(0)] * len(names)
    count = 0
    for feed in batches:
        values = session.run(order, dict(feed))
        weight = next(iter(feed.values())).shape[0]  # the means are over the batch
        sums = [s + v.astype(np.float64) * weight if s.size else v.astype(np.float64) * weight for s, v in zip(sums, values)]
        count += weight
    if count == 0:
        return {}
    return {n: (s / count).astype(np.float32) for n, s in zip(names, sums)}


def apply_deltas(fp32: onnx.ModelProto, deltas: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``fp32`` with ``deltas`` added to those bias initializers."""
    model = copy.deepcopy(fp32)
    for init in model.graph.initializer:
        if init.name in deltas:
            value = numpy_helper.to_array(init).astype(np.float32) + deltas[init.name].reshape(-1)
            init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
    return model
