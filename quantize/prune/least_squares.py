"""Channel pruning with calibration data: choose the channels and re-fit the
layers that read them by least squares (:func:`obs_select`), on statistics
of what the model computes on the data (:func:`statistics`).

With calibration data the choice and the repair are made in the space that
matters, the sinks' outputs. For a sink that is linear in the pruned
channels (a 1x1 Conv, a Gemm) with input covariance H and weight W, removing
channel c and re-fitting the other columns optimally costs
``||W[:, c]||^2 / [H^-1]_cc`` (Optimal Brain Surgeon); channels are removed
one at a time, cheapest first, each removal updating W and H^-1 in closed
form, and the input mean of the removed channels goes into the bias. The
result is the least-squares best reconstruction of every sink's output from
the kept channels on the calibration data: no gradient steps, no labels.

ONNX Runtime is imported only when statistics are gathered. Pure functions
(each statistics run has its own session); safe from any thread.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import onnx

from quantize.prune.graph import GraphIndex, attribute, subgraph_inputs


#: Ridge on the input covariance, relative to its mean diagonal.
_DAMPING = 0.01


def linear_sink(index: GraphIndex, node: onnx.NodeProto, kind: str) -> bool:
    """Whether the sink's output is ``W @ channels + b`` pixel by pixel (1x1 Conv, Gemm)."""
    if kind in ("gemm", "gemm_t"):
        return float(attribute(node, "beta", 1.0)) != 0.0
    if kind != "conv":
        return False
    dims = index.inits[node.input[1]].dims
    pads = attribute(node, "pads", None) or [0]
    return all(d == 1 for d in dims[2:]) and not any(pads) and attribute(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"VALID", "VALID")


def stat_tensor(index: GraphIndex, tensor: str) -> str:
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


def feeds(calibration) -> Iterable[dict[str, np.ndarray]]:
    """Input dicts from an ORT-style reader (``get_next()``) or an iterable of dicts."""
    if hasattr(calibration, "get_next"):
        while (feed := calibration.get_next()) is not None:
            yield feed
    else:
        yield from calibration


@dataclass
class Stats:
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
            needed |= subgraph_inputs(node)
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


def statistics(
    model: onnx.ModelProto, tensors: Sequence[str], types: dict[str, int],
    feeds: Iterable[dict[str, np.ndarray]], max_rows: int,
) -> dict[str, Stats]:
    """:class:`Stats` of each tensor (channel axis 1) over what ``model`` computes from ``feeds``."""
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
        stats[name] = Stats(mean, gram / rows - np.outer(mean, mean))
    return stats


def _damped_inverse(cov: np.ndarray) -> np.ndarray:
    damp = _DAMPING * max(float(np.mean(np.diag(cov))), 1e-12)
    return np.linalg.inv(cov + damp * np.eye(len(cov)))


def obs_select(weights: list[np.ndarray], covs: list[np.ndarray], n_remove: int) -> tuple[np.ndarray, list[np.ndarray]]:
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


def as_matrix(weight: np.ndarray, kind: str) -> np.ndarray:
    """A sink's weight as [out, channels]."""
    if kind == "conv":
        return weight.reshape(weight.shape[0], weight.shape[1])
    return weight if kind == "gemm_t" else weight.T


def from_matrix(matrix: np.ndarray, kind: str, like: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return matrix.reshape(like.shape).astype(like.dtype)
    return (matrix if kind == "gemm_t" else matrix.T).astype(like.dtype)
