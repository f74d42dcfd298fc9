"""The one-call API: FP32 ONNX in, a full-integer TFLite model out
(:func:`convert_int8`), or the same with automatic mixed precision
(:func:`convert_int8_mixed`). Each call starts its own worker and stops it.

Safe to call concurrently (each call has its own worker process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

from quantize.tflite.converter import TfliteConverter
from quantize.tflite.results import TfliteArtifact
from quantize.tflite.session import Progress


def convert_int8(
    onnx_fp32: Path,
    calibration: np.ndarray,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    out: Path,
    *,
    per_channel: bool = True,
    float_nodes: Sequence[str] = (),
    env: Path | None = None,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
) -> TfliteArtifact:
    """FP32 ONNX -> full-integer TFLite (int8 input and output) at ``out``.

    ``calibration``: NHWC float32 RGB images in [0, 1], (N, H, W, 3), already
    resized/cropped like the device's preprocessing; ``mean``/``std`` are the
    model's normalisation (applied to the calibration data here; the int8
    model's input is the normalised image, like the ONNX model's).
    ``float_nodes``: layer names (:meth:`TfliteConverter.layers`) to keep in
    float. Raises :class:`QuantizeError` when the converter env is missing,
    the conversion fails (with the tail of its output), or the result needs
    Flex/custom ops (naming them).
    """
    with TfliteConverter(env, progress=progress, cache_dir=cache_dir) as conv:
        conv.prepare(onnx_fp32, calibration, mean, std)
        return conv.quantize(out, float_nodes, per_channel=per_channel)


def convert_int8_mixed(
    onnx_fp32: Path,
    calibration: np.ndarray,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    out: Path,
    *,
    evaluate: Callable[[Path], float],
    target: float,
    max_float_nodes: int = 20,
    per_channel: bool = True,
    env: Path | None = None,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
    method: Literal["isolation", "debugger"] = "isolation",
    rule: Literal["first", "stable"] = "first",
    score: Literal["kl", "nsr"] = "kl",
) -> TfliteArtifact:
    """Like :func:`convert_int8`, then automatic mixed precision: rank the
    layers by sensitivity and keep the fewest most sensitive ones in float
    (input and output stay int8) until ``evaluate(path) >= target``.

    ``evaluate`` runs a candidate .tflite (in this environment) and returns
    its agreement with fp32 (top-1, or a detector's mAP@0.5); ``score`` is
    the sensitivity measure (``kl`` for class logits, ``nsr`` otherwise); give it data that is not the evaluation
    set you report on. The result's ``float_nodes``/``float_layers`` say what
    was kept in float, ``agreement``/``target_met``/``trials`` how the search
    went. See :meth:`TfliteConverter.search`.
    """
    with TfliteConverter(env, progress=progress, cache_dir=cache_dir) as conv:
        conv.prepare(onnx_fp32, calibration, mean, std)
        return conv.search(
            out, evaluate=evaluate, target=target, max_float_nodes=max_float_nodes, per_channel=per_channel,
            method=method, rule=rule, score=score,
        )
