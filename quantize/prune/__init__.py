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

No fine-tuning happens here. Pruning a quarter of every expansion of
MobileNetV2 costs a lot of top-1 agreement even with calibration data (and
nearly all of it without): the report and the evaluation must say so.

Errors: arguments out of range are :class:`~quantize.errors.QuantizeInputError`
(exit 2); a result that fails the ONNX checker or shape inference is a
:class:`~quantize.errors.QuantizeError` (exit 1) and means a bug here.

One thing per module:

* :mod:`.spec` — a ``--prune`` value, parsed and applied;
* :mod:`.report` — what a pass reports;
* :mod:`.sizes` — parameter counts and compressed (download) sizes;
* :mod:`.graph` — the graph index both passes read;
* :mod:`.magnitude` — the magnitude pass;
* :mod:`.groups` — channel pruning's dependency analysis (which channels must
  move together, and which groups are left alone, with the reason);
* :mod:`.datafree` / :mod:`.least_squares` — choosing the channels and
  repairing the loss, without or with calibration data;
* :mod:`.channels` — the channel pass (plan, choose, slice);
* :mod:`.check` — the final check of a rewritten graph.
"""

from quantize.prune.channels import prune_channels
from quantize.prune.magnitude import prune_magnitude
from quantize.prune.report import ChannelGroup, LayerPrune, PruneReport, SkippedLayer
from quantize.prune.sizes import compressed_size, count_params
from quantize.prune.spec import PruneSpec

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
