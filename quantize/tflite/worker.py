"""The TFLite conversion worker: runs in the converter's own environment
(``scripts/setup_onnx2tf.sh``: Python >= 3.12, TensorFlow, onnx2tf, onnxsim),
never in the agent's.

:class:`quantize.tflite.session.WorkerProcess` starts it as
``<converter env>/bin/python -P <this file>`` in a temporary folder (its
working folder: onnx2tf writes there). It is standalone on purpose: at module
level it imports only the standard library and numpy, and TensorFlow, onnx,
onnxsim, onnx2tf and LiteRT only inside the steps that use them, so the
converter environment needs nothing of edge-agent and the main environment
can import this module (tests, linters) without TensorFlow.

Protocol, JSON lines: one request per line on stdin, ``{"cmd": NAME, ...}``
with NAME one of :data:`HANDLERS` or ``exit``; for each request, any number
of ``{"progress": TEXT}`` lines, then one reply, ``{"ok": true, ...}`` or
``{"ok": false, "error": TEXT, "code": CODE}`` (``CODE`` becomes the
:class:`~quantize.errors.QuantizeError` code on the caller's side).
Everything libraries print goes to stderr (the caller's log file):
:func:`main` keeps a private copy of the original stdout for the protocol and
points file descriptor 1 at stderr.

The steps (see :mod:`quantize.tflite` for what they are for):

* ``prepare``: batch 1, onnxsim, onnx2tf, the float TFLite model, calibration
  (cached by content when a cache folder is given);
* ``quantize``: the full-integer model, some layers optionally left in float;
* ``float``: the float model as it is;
* ``sensitivity``: the layers ranked by how much quantizing each one hurts.

Thread-safety: one request at a time on the main thread; the prepared model
is module state (:data:`STATE`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from typing import Any, Iterable

import numpy as np

#: Part of the cache key of prepared models: change it when what ``prepare``
#: stores changes.
VERSION = "1"

#: The prepared model: ``float`` and ``calibrated`` flatbuffers, the
#: normalised calibration ``data`` in the TF model's layout, its ``meta``
#: and the ``cache`` folder (or None).
STATE: dict[str, Any] = {}

_proto = None  # the protocol's stream (the original stdout), set by main()


class Refused(Exception):
    """A request the worker declines, with the error code the caller reports."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def send(**msg: Any) -> None:
    """Write one protocol line."""
    _proto.write(json.dumps(msg) + "\n")
    _proto.flush()


def progress(text: str) -> None:
    """Tell the caller what is happening (its ``progress`` callback gets ``text``)."""
    send(progress=text)


# --------------------------------------------------------------------------
# Running and reading TFLite models
# --------------------------------------------------------------------------


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter


def interpreter(content: bytes):
    """A LiteRT interpreter for a model, tensors allocated."""
    it = _interpreter_class()(model_content=content, num_threads=max(1, min(4, os.cpu_count() or 1)))
    it.allocate_tensors()
    return it


def interpreter_noalloc(content: bytes):
    """A LiteRT interpreter for reading a model's ops and tensors only."""
    return _interpreter_class()(model_content=content)


def run_model(content: bytes, data: np.ndarray) -> np.ndarray:
    """The model's first output (dequantized, flattened) for each input of
    ``data``, one at a time; an integer input is quantized with its params."""
    it = interpreter(content)
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    outs = []
    for x in data:
        x = x[None]
        if i["dtype"] != np.float32:
            s, z = i["quantization"]
            x = np.clip(np.round(x / s) + z, -128, 127).astype(i["dtype"])
        it.set_tensor(i["index"], x)
        it.invoke()
        y = it.get_tensor(o["index"]).astype(np.float32)
        if o["dtype"] != np.float32:
            s, z = o["quantization"]
            y = (y - z) * s
        outs.append(y.reshape(-1))
    return np.stack(outs)


def op_names(content: bytes) -> list[str]:
    """The model's ops, in order of first use."""
    it = interpreter_noalloc(content)
    names: list[str] = []
    for d in it._get_ops_details():
        if d["op_name"] not in names:
            names.append(d["op_name"])
    return names


def versions() -> dict[str, str]:
    """The converter's versions (part of the cache key)."""
    from importlib.metadata import version

    out = {}
    for dist in ("onnx2tf", "tensorflow", "onnxsim", "onnx"):
        try:
            out[dist] = version(dist)
        except Exception:
            out[dist] = "?"
    return out


def verified_layer(verify_name: str) -> str:
    """The layer a NumericVerify tensor checks, named the way
    ``QuantizationDebugger`` names it (what ``denylisted_nodes`` takes):
    ``"NumericVerify/<tensor name>[digit]:<index>"`` -> ``<tensor name>``."""
    base = verify_name.rsplit(":", 1)[0][len("NumericVerify") + 1:]
    if base and base[-1].isdigit():
        base = base[:-1]
    return base


def quantizable_layers(calibrated: bytes) -> list[dict[str, Any]]:
    """(name, op) of each layer the quantizer can keep in float, graph order:
    the inputs of the NumericVerify ops of the debug model."""
    from tensorflow.lite.python import convert

    dbg = convert.mlir_quantize(calibrated, enable_numeric_verify=True)
    it = interpreter_noalloc(dbg)
    defining = {}
    ops = it._get_ops_details()
    for op in ops:
        for t in op["outputs"]:
            defining[int(t)] = op["op_name"]
    layers = []
    for op in ops:
        if op["op_name"] != "NumericVerify":
            continue
        q_idx = int(op["inputs"][0])
        name = it._get_tensor_details(int(op["outputs"][0]), subgraph_index=0)["name"]
        layers.append({"name": verified_layer(name), "op": defining.get(q_idx, "?"), "tensor": q_idx})
    layers.sort(key=lambda d: d["tensor"])
    return [{"name": d["name"], "op": d["op"], "index": k} for k, d in enumerate(layers)]


# --------------------------------------------------------------------------
# prepare: ONNX -> float TFLite -> calibrated
# --------------------------------------------------------------------------


def _cache_folder(req: dict[str, Any], calib01: np.ndarray) -> tuple[str | None, str | None]:
    """``(key, folder)`` of the prepared model in the cache, keyed by the
    sha256 of the model, the calibration data, mean/std and the converter's
    versions; ``(None, None)`` without a cache."""
    if not req.get("cache_dir"):
        return None, None
    h = hashlib.sha256()
    with open(req["onnx"], "rb") as f:
        h.update(f.read())
    h.update(calib01.tobytes())
    h.update(str(calib01.shape).encode())
    h.update(json.dumps([req["mean"], req["std"], versions(), VERSION]).encode())
    key = h.hexdigest()[:32]
    return key, os.path.join(req["cache_dir"], "prepared", key)


def _load_cached(cache: str) -> tuple[bytes, bytes, dict[str, Any]] | None:
    if not all(os.path.exists(os.path.join(cache, f)) for f in ("float.tflite", "calibrated.tflite", "meta.json")):
        return None
    with open(os.path.join(cache, "float.tflite"), "rb") as f:
        float_model = f.read()
    with open(os.path.join(cache, "calibrated.tflite"), "rb") as f:
        calibrated = f.read()
    with open(os.path.join(cache, "meta.json")) as f:
        meta = json.load(f)
    return float_model, calibrated, meta


def _store(cache: str, float_model: bytes, calibrated: bytes, meta: dict[str, Any]) -> None:
    """Write the prepared model to the cache, each file atomically."""
    os.makedirs(cache, exist_ok=True)
    for fname, blob in (("float.tflite", float_model), ("calibrated.tflite", calibrated)):
        with open(os.path.join(cache, fname + ".tmp"), "wb") as f:
            f.write(blob)
        os.replace(os.path.join(cache, fname + ".tmp"), os.path.join(cache, fname))
    with open(os.path.join(cache, "meta.json.tmp"), "w") as f:
        json.dump(meta, f)
    os.replace(os.path.join(cache, "meta.json.tmp"), os.path.join(cache, "meta.json"))


def _normalised(calib01: np.ndarray, mean: np.ndarray, std: np.ndarray, layout: str) -> np.ndarray:
    data = ((calib01 - mean) / std).astype(np.float32)
    if layout == "nchw":
        data = data.transpose(0, 3, 1, 2)
    return data


def _convert(onnx_path: str, calib01: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[bytes, bytes, dict[str, Any]]:
    """The expensive part of ``prepare``: onnxsim, onnx2tf, TensorFlow's
    converter and calibrator."""
    import onnx
    import onnxsim

    n, H, W, C = calib01.shape
    model = onnx.load(onnx_path)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise Refused(f"the model has {len(inputs)} inputs; the TFLite path handles one image input", "bad_input")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise Refused(f"input {inputs[0].name!r} has rank {len(dims)}; expected an image [N,C,H,W]", "bad_input")
    d = [x.dim_value if x.HasField("dim_value") and x.dim_value > 0 else None for x in dims]
    if d[1] in (C, None) and d[3] != C:
        shape = [1, C, H, W]
    elif d[3] == C:
        shape = [1, H, W, C]
    else:
        shape = [1, C, H, W]
    for fixed, want in zip(d[1:], shape[1:]):
        if fixed is not None and fixed != want:
            raise Refused(f"input {inputs[0].name!r} is {d} but the calibration images are {H}x{W}x{C}", "bad_input")
    progress(f"simplifying with onnxsim (input {inputs[0].name} {shape})")
    simplified, ok = onnxsim.simplify(model, overwrite_input_shapes={inputs[0].name: shape})
    if not ok:
        raise Refused("onnxsim could not validate the simplified model", "conversion_failed")
    work = os.getcwd()
    sim_path = os.path.join(work, "simplified.onnx")
    onnx.save(simplified, sim_path)
    progress("onnx2tf: building the TensorFlow graph")
    import onnx2tf

    keras_model = onnx2tf.convert(
        input_onnx_file_path=sim_path,
        output_folder_path=os.path.join(work, "onnx2tf"),
        tflite_backend="tf_converter",
        not_use_onnxsim=True,
        disable_model_save=True,
        verbosity="error",
        # onnx2tf takes every 4-D input for NCHW and transposes it; an input
        # that is already NHWC (models exported from TensorFlow, e.g. YOLO
        # through tf2onnx) must keep its shape.
        keep_shape_absolutely_input_names=[inputs[0].name] if shape[3] == C else None,
    )
    import tensorflow as tf

    in_shape = [int(s) for s in keras_model.inputs[0].shape]
    progress("TensorFlow: converting to a float TFLite model")
    conv = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    float_model = conv.convert()
    float_ops = op_names(float_model)
    bad = [o for o in float_ops if o.startswith("Flex") or not o.isupper()]
    if bad:
        raise Refused(f"the converted model needs TensorFlow (Flex/custom) ops: {', '.join(bad)}", "unsupported_ops")
    if in_shape[1:] == [H, W, C]:
        tf_layout = "nhwc"
    elif in_shape[1:] == [C, H, W]:
        tf_layout = "nchw"
    else:
        raise Refused(f"onnx2tf made input {in_shape}, which matches no layout of {H}x{W}x{C} images", "conversion_failed")
    data = _normalised(calib01, mean, std, tf_layout)
    progress(f"calibrating on {n} images")
    from tensorflow.lite.python.optimize import calibrator as _calibrator

    def gen():
        for x in data:
            yield [x[None]]

    calibrated = _calibrator.Calibrator(_calibrator.add_intermediate_tensors(float_model)).calibrate(gen)
    meta = {"input_shape": in_shape, "layout": tf_layout, "float_ops": float_ops,
            "layers": quantizable_layers(calibrated), "versions": versions()}
    return float_model, calibrated, meta


def prepare(req: dict[str, Any]) -> dict[str, Any]:
    """Convert and calibrate ``req["onnx"]`` on the images in
    ``req["calibration"]`` (an .npy, NHWC in [0, 1]) normalised with
    ``req["mean"]``/``req["std"]``; the result becomes :data:`STATE`."""
    t0 = time.perf_counter()
    calib01 = np.load(req["calibration"])
    mean = np.asarray(req["mean"], np.float32)
    std = np.asarray(req["std"], np.float32)
    key, cache = _cache_folder(req, calib01)
    found = _load_cached(cache) if cache else None
    if found is not None:
        float_model, calibrated, meta = found
        progress("prepared model taken from the cache")
    else:
        float_model, calibrated, meta = _convert(req["onnx"], calib01, mean, std)
        if cache:
            _store(cache, float_model, calibrated, meta)
    data = _normalised(calib01, mean, std, meta["layout"])
    STATE.update(float=float_model, calibrated=calibrated, data=data, meta=meta, cache=cache)
    return {**meta, "cached": found is not None, "key": key, "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------
# quantize, float
# --------------------------------------------------------------------------


def quantize_bytes(float_nodes: Iterable[str], per_channel: bool = True, int8_io: bool = True) -> bytes:
    """The prepared model, full integer but for ``float_nodes``."""
    import tensorflow as tf
    from tensorflow.lite.python import convert

    kwargs: dict[str, Any] = dict(disable_per_channel=not per_channel, denylisted_nodes=list(float_nodes) or None)
    if int8_io:
        kwargs.update(input_data_type=tf.int8, output_data_type=tf.int8)
    return convert.mlir_quantize(STATE["calibrated"], **kwargs)


def quantize(req: dict[str, Any]) -> dict[str, Any]:
    """Write the int8 model (``req["float_nodes"]`` kept in float) to ``req["out"]``."""
    blob = quantize_bytes(req.get("float_nodes") or [], req.get("per_channel", True))
    with open(req["out"], "wb") as f:
        f.write(blob)
    return {"bytes": len(blob)}


def export_float(req: dict[str, Any]) -> dict[str, Any]:
    """Write the float model to ``req["out"]``."""
    with open(req["out"], "wb") as f:
        f.write(STATE["float"])
    return {"bytes": len(STATE["float"])}


# --------------------------------------------------------------------------
# sensitivity
# --------------------------------------------------------------------------


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl(ref: np.ndarray, cand: np.ndarray) -> float:
    """Mean KL(softmax(ref) || softmax(cand)) over the rows of two logit arrays."""
    lp, lq = log_softmax(ref), log_softmax(cand)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))


def nsr(ref: np.ndarray, cand: np.ndarray) -> float:
    """Noise-to-signal ratio: mean squared difference over the variance of
    ``ref`` (raw outputs that are no class logits, e.g. a detector's)."""
    ref64 = ref.astype(np.float64)
    return float(np.mean((ref64 - cand) ** 2) / max(float(np.var(ref64)), 1e-12))


#: How far a candidate's outputs are from the float model's, by name.
SCORES = {"kl": kl, "nsr": nsr}


def _isolation_scores(names: list[str], sub: np.ndarray, score: str = "kl") -> list[tuple[str, float]]:
    """Each layer quantized alone (the rest float): how far its outputs move
    from fp32 (``score``: KL of the softmax for a classifier, noise-to-signal
    for other outputs)."""
    measure = SCORES[score]
    ref = run_model(STATE["float"], sub)
    scores = []
    for k, name in enumerate(names):
        cand = quantize_bytes([n for n in names if n != name], int8_io=False)
        scores.append((name, measure(ref, run_model(cand, sub))))
        if k % 8 == 7 or k == len(names) - 1:
            progress(f"sensitivity: {k + 1}/{len(names)} layers")
    return scores


def _debugger_scores(names: list[str], sub: np.ndarray) -> list[tuple[str, float]]:
    """QuantizationDebugger's noise-to-signal ratio of each layer."""
    import tensorflow as tf
    from tensorflow.lite.python import convert

    def nsr(f, q, scale, zero_point):
        d = (q.astype(np.float32) - zero_point) * scale
        return float(np.sum((f - d) ** 2) / max(float(np.sum(f.astype(np.float64) ** 2)), 1e-12))

    def gen():
        for x in sub:
            yield [x[None]]

    dbg = tf.lite.experimental.QuantizationDebugger(
        quant_debug_model_content=convert.mlir_quantize(STATE["calibrated"], enable_numeric_verify=True),
        debug_dataset=gen,
        debug_options=tf.lite.experimental.QuantizationDebugOptions(layer_direct_compare_metrics={"nsr": nsr}),
    )
    progress(f"QuantizationDebugger on {len(sub)} images")
    dbg.run()
    by_layer = {verified_layer(name): float(metrics["nsr"]) for name, metrics in dbg.layer_statistics.items()}
    return [(name, by_layer.get(name, 0.0)) for name in names]


def sensitivity(req: dict[str, Any]) -> dict[str, Any]:
    """The layers ranked by ``req["method"]`` on up to ``req["samples"]``
    calibration images, most harmful first (cached beside the prepared model)."""
    method = req.get("method", "isolation")
    samples = max(1, int(req.get("samples", 32)))
    score = req.get("score", "kl")
    if score not in SCORES:
        raise Refused(f"unknown sensitivity score {score!r}", "bad_input")
    cache_file = None
    if STATE.get("cache"):
        suffix = "" if score == "kl" else f"-{score}"
        cache_file = os.path.join(STATE["cache"], f"sensitivity-{method}-{samples}{suffix}.json")
        if os.path.exists(cache_file):
            with open(cache_file) as f:
                progress("sensitivity ranking taken from the cache")
                return {"ranking": json.load(f)}
    data = STATE["data"]
    idx = np.linspace(0, len(data) - 1, min(samples, len(data))).round().astype(int)
    sub = data[np.unique(idx)]
    names = [layer["name"] for layer in STATE["meta"]["layers"]]
    if method == "isolation":
        scores = _isolation_scores(names, sub, score)
    elif method == "debugger":
        scores = _debugger_scores(names, sub)
    else:
        raise Refused(f"unknown sensitivity method {method!r}", "bad_input")
    ranking = sorted(scores, key=lambda item: -item[1])
    if cache_file:
        with open(cache_file + ".tmp", "w") as f:
            json.dump(ranking, f)
        os.replace(cache_file + ".tmp", cache_file)
    return {"ranking": ranking}


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------

#: The requests, by ``cmd``.
HANDLERS = {"prepare": prepare, "quantize": quantize, "float": export_float, "sensitivity": sensitivity}


def serve(lines: Iterable[str]) -> None:
    """Answer requests until ``exit`` or the end of input. A failure is
    replied to (its traceback goes to stderr) and the loop goes on."""
    for line in lines:
        if not line.strip():
            continue
        req = json.loads(line)
        cmd = req.pop("cmd")
        if cmd == "exit":
            break
        try:
            if cmd != "prepare" and "calibrated" not in STATE:
                raise Refused("no model prepared", "conversion_failed")
            send(ok=True, **HANDLERS[cmd](req))
        except Refused as exc:
            send(ok=False, error=str(exc), code=exc.code)
        except SystemExit as exc:
            traceback.print_exc()
            send(ok=False, error=f"the converter called exit({exc.code})", code="conversion_failed")
        except BaseException as exc:
            traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            send(ok=False, error=f"{type(exc).__name__}: {first}", code="conversion_failed")


def main() -> None:
    """Keep stdout for the protocol, send everything printed to stderr, serve stdin."""
    global _proto
    _proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin)


if __name__ == "__main__":
    main()
