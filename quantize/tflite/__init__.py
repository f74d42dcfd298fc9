"""Full-integer TFLite (int8 input and output) from an FP32 ONNX model.

The conversion runs onnx2tf and TensorFlow's converter in an environment of
their own (``scripts/setup_onnx2tf.sh``): onnx2tf needs Python >= 3.12 and
pins numpy, onnxruntime and OpenCV builds that clash with the agent's. This
package never imports TensorFlow or onnx2tf; it starts the converter env's
python on :mod:`quantize.tflite.worker` and talks to it in JSON lines, so the
expensive steps happen once per model and every mixed-precision candidate
after them costs about a second:

1. **prepare** (once, cacheable): fix the batch to 1, simplify with onnxsim,
   onnx2tf builds the TF graph (NHWC), TensorFlow's converter makes the float
   TFLite flatbuffer, and TensorFlow's calibrator records every tensor's range
   on the calibration images (normalised with the given mean/std, as
   ``onnx2tf -cind input calib.npy MEAN STD`` would).
2. **quantize** (per candidate): TensorFlow's MLIR quantizer turns the
   calibrated model into a full-integer one (int8 in and out, per-channel
   weights), optionally keeping ``float_nodes`` in float: the same call
   ``tf.lite.experimental.QuantizationDebugger.get_nondebug_quantized_model``
   makes, with int8 input/output types. Each float island is wrapped in
   DEQUANTIZE/QUANTIZE; the model's input and output stay int8.
3. **sensitivity**: how much each quantizable layer alone moves the outputs
   away from fp32 (see :meth:`TfliteConverter.sensitivity`).

Every result is checked: a model holding TensorFlow (Flex) or other custom
ops is refused, naming them, because the device's LiteRT cannot run them.

The int8 model's input is the *normalised* NHWC image, like the ONNX model's
(``(pixel/255 - mean) / std``); ``TfliteArtifact.input_quant`` holds the
scale/zero-point the runtime quantizes it with.

One thing per module:

* :mod:`.env` — finding the converter environment; the cache folder;
* :mod:`.worker` — the worker itself (runs in the converter environment only);
* :mod:`.session` — one worker process and the conversation with it;
* :mod:`.converter` — :class:`TfliteConverter`, the driver (prepare,
  quantize, sensitivity, the mixed-precision search);
* :mod:`.convert` — the one-call API, :func:`convert_int8` and
  :func:`convert_int8_mixed`;
* :mod:`.flatbuffer` — reading a .tflite file and refusing Flex/custom ops;
* :mod:`.results` — what comes back (layers, sensitivities, artifacts).

Thread-safety: a :class:`TfliteConverter` owns one worker process; use it
from one thread. The module-level functions are safe to call concurrently
(each starts its own worker).
"""

from quantize.tflite.convert import convert_int8, convert_int8_mixed
from quantize.tflite.converter import TfliteConverter
from quantize.tflite.env import DEFAULT_CACHE, DEFAULT_ENV, ENV_VAR, SETUP_SCRIPT, find_converter_env
from quantize.tflite.flatbuffer import ModelInfo, TensorInfo, check_ops, forbidden_ops, list_ops, read_model
from quantize.tflite.results import Layer, Sensitivity, TfliteArtifact

__all__ = [
    "DEFAULT_CACHE",
    "DEFAULT_ENV",
    "ENV_VAR",
    "SETUP_SCRIPT",
    "Layer",
    "ModelInfo",
    "Sensitivity",
    "TensorInfo",
    "TfliteArtifact",
    "TfliteConverter",
    "check_ops",
    "convert_int8",
    "convert_int8_mixed",
    "find_converter_env",
    "forbidden_ops",
    "list_ops",
    "read_model",
]
