"""Magnitude pruning (``--prune magnitude:S``): zero the smallest weights of
every Conv/Gemm/MatMul layer.

Shapes and latency do not change; the file compresses better, which is what
an OTA download over MQTT costs (:func:`quantize.prune.sizes.compressed_size`).

:func:`prune_magnitude` changes the model it is given, in place: one model
per call, from one thread at a time.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from quantize.prune.graph import FLOAT_TYPES, GraphIndex, conv_kind, node_name, replace_initializer
from quantize.prune.report import LayerPrune, PruneReport, SkippedLayer, check_fraction
from quantize.prune.sizes import count_elements, count_params


#: Layers with fewer weights than this are not magnitude-pruned: the saving is
#: nil and such layers (a 3-channel stem, a tiny head) are the most sensitive.
MIN_WEIGHTS = 128


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
    check_fraction("magnitude sparsity", sparsity)
    index = GraphIndex(model)
    total_before, nonzero_before = count_params(model)
    report = PruneReport("magnitude", float(sparsity), total_before, total_before, nonzero_before, nonzero_before)
    done: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        name = node_name(node)
        found = index.weight(node)
        if found is None:
            report.skipped.append(SkippedLayer(name, node.op_type, "weight is computed at run time, not an initializer"))
            continue
        _, wname = found
        if node.op_type == "Conv" and not include_depthwise and conv_kind(node, index) == "depthwise":
            report.skipped.append(SkippedLayer(name, node.op_type, "depthwise convolution (few, sensitive weights); include_depthwise=True prunes it"))
            continue
        if wname in done:
            report.skipped.append(SkippedLayer(name, node.op_type, f"shares its weight with {done[wname]}, pruned once"))
            continue
        init = index.inits[wname]
        if init.data_type not in FLOAT_TYPES:
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
        before, after = count_elements([w]), count_elements([pruned])
        replace_initializer(index, wname, pruned)
        report.layers.append(LayerPrune(
            name, node.op_type, wname, tuple(w.shape), tuple(w.shape), before[0], after[0], before[1], after[1],
        ))
    report.params_after, report.nonzero_after = count_params(model)
    return report
