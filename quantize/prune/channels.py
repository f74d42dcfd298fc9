"""Channel pruning (``--prune channels:R``): remove a fraction of the output
channels of convolutions together with every tensor slice that depends on
them downstream — depthwise convolutions and BatchNormalization on the way,
the input channels of the next convolution, the input columns of a
Gemm/MatMul head — and repair what the removal costs.

The pass: plan the groups (:mod:`quantize.prune.groups`), choose the
channels and repair the layers that read them, without data
(:mod:`quantize.prune.datafree`) or with it
(:mod:`quantize.prune.least_squares`), slice every initializer, and check the
result (:mod:`quantize.prune.check`).

Groups joined by an ``Add`` are pruned identically across every source only
with ``prune_residual=True``, and groups with no activation between their
sources and sinks (linear bottlenecks) only with ``prune_linear=True``. So by
default the residual streams and bottlenecks stay, and what is pruned is the
expansion channels of inverted residual blocks (1x1 expand -> depthwise -> 1x1
project), the stem and the last 1x1 conv before the classifier: the classic
safe choice for MobileNetV2.

:func:`prune_channels` changes the model it is given, in place: one model per
call, from one thread at a time.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from quantize.errors import QuantizeInputError
from quantize.prune.check import reinfer
from quantize.prune.datafree import constant_activations, importance, sink_delta
from quantize.prune.graph import GraphIndex, attribute, node_name, replace_initializer
from quantize.prune.groups import NONLINEAR, Group, check_group, find_groups
from quantize.prune.least_squares import Stats, as_matrix, feeds, from_matrix, linear_sink, obs_select, stat_tensor, statistics
from quantize.prune.report import ChannelGroup, LayerPrune, PruneReport, SkippedLayer, check_fraction
from quantize.prune.sizes import count_elements, count_params


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

    For every channel group (see :mod:`quantize.prune.groups`) with ``C`` channels,
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
    check_fraction("channel prune ratio", ratio)
    if min_channels < 1 or channel_multiple < 1:
        raise QuantizeInputError("min_channels and channel_multiple must be at least 1")
    index = GraphIndex(model, shapes=True)
    total_before, nonzero_before = count_params(model)
    report = PruneReport("channels", float(ratio), total_before, total_before, nonzero_before, nonzero_before)

    # 1. Which groups, how many channels each.
    planned: list[tuple[Group, int, int]] = []
    for group in find_groups(index):
        label = ", ".join(node_name(s) for s in group.sources) or "?"
        why = check_group(index, group)
        if why is None and group.joins and not prune_residual:
            why = f"joined by {group.joins[0].op_type} {node_name(group.joins[0])} (residual); prune_residual=True prunes it"
        if why is None and not prune_linear and not any(n.op_type in NONLINEAR for n in group.chain):
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

    stats: dict[str, Stats] = {}
    if calibration is not None:
        calibration_feeds = list(feeds(calibration))
        if not calibration_feeds:
            raise QuantizeInputError("channel pruning: the calibration data is empty")
        wanted = list(dict.fromkeys(
            stat_tensor(index, n.input[0])
            for g, _, _ in planned
            if all(linear_sink(index, n, k) and g.block[n.input[0]] == 1 for n, k in g.sinks)
            for n, _ in g.sinks
        ))
        if wanted:
            stats = statistics(model, wanted, index.types, calibration_feeds, max_rows_per_sample)

    # 2. Choose the channels and repair the sinks, on full-width arrays.
    before = {name: numpy_helper.to_array(init) for name, init in index.inits.items()}
    arrays = dict(before)
    taken = {n for node in index.nodes for n in [*node.input, *node.output]} | set(index.inits)
    plans: list[tuple[Group, np.ndarray]] = []
    for group, channels, keep_n in planned:
        deltas: dict[int, np.ndarray] = {}
        sink_stats = [stats.get(stat_tensor(index, n.input[0])) for n, _ in group.sinks]
        if stats and all(st is not None for st in sink_stats):
            rule = "least_squares"
            mats = [as_matrix(arrays[index.weight(n)[1]], k) for n, k in group.sinks]
            keep, fitted = obs_select(mats, [st.cov for st in sink_stats], channels - keep_n)
            for (node, kind), old, new, st in zip(group.sinks, mats, fitted, sink_stats):
                wname = index.weight(node)[1]
                arrays[wname] = from_matrix(new, kind, arrays[wname])
                deltas[id(node)] = (old.astype(np.float64) - new) @ st.mean
        else:
            rule = "l1"
            keep = np.sort(np.argsort(-importance(index, group), kind="stable")[:keep_n])
            removed = np.setdiff1d(np.arange(channels), keep)
            values = constant_activations(index, group, arrays)
            if values is not None:
                for node, kind in group.sinks:
                    b = group.block[node.input[0]]
                    const = np.repeat(values[node.input[0]], b)
                    delta = sink_delta(kind, arrays[index.weight(node)[1]], const, _columns(removed, b))
                    if delta is not None:
                        deltas[id(node)] = delta
                        rule = "l1+constant"
        for node, kind in group.sinks:
            if id(node) not in deltas:
                continue
            delta = deltas[id(node)]
            if kind in ("gemm", "gemm_t"):
                beta = float(attribute(node, "beta", 1.0))
                if beta == 0:
                    continue
                delta = delta * float(attribute(node, "alpha", 1.0)) / beta
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
            if bias:
                arrays[bias] = (arrays[bias] + delta).astype(before[bias].dtype)
            else:
                _add_bias(model, index, node, delta.astype(before[node.input[1]].dtype), taken, arrays, before)
        plans.append((group, keep))
        report.groups.append(ChannelGroup(
            tuple(node_name(s) for s in group.sources),
            tuple(node_name(n) for n, _ in group.sinks),
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
            replace_initializer(index, name, array)

    position = {id(node): i for i, node in enumerate(index.nodes)}
    for wname, node in sorted(changed.items(), key=lambda kv: position[id(kv[1])]):
        b, a = count_elements([before[wname]]), count_elements([arrays[wname]])
        report.layers.append(LayerPrune(
            node_name(node), node.op_type, wname, tuple(before[wname].shape), tuple(arrays[wname].shape),
            b[0], a[0], b[1], a[1],
        ))

    reinfer(model)
    report.params_after, report.nonzero_after = count_params(model)
    return report


def _columns(channels: np.ndarray, block: int) -> np.ndarray:
    """The input columns of channels laid out ``block`` consecutive elements each (Flatten of an HxW map)."""
    return (np.asarray(channels)[:, None] * block + np.arange(block)).ravel()


def _add_bias(
    model: onnx.ModelProto, index: GraphIndex, node: onnx.NodeProto, bias: np.ndarray,
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
