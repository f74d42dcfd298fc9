"""Full-integer TFLite (int8 input and output) from an FP32 ONNX model.

The conversion runs onnx2tf and TensorFlow's converter in an environment of
their own (``scripts/setup_onnx2tf.sh``): onnx2tf needs Python >= 3.12 and
pins numpy, onnxruntime and OpenCV builds that clash with the agent's. This
module never imports TensorFlow or onnx2tf; it starts the converter env's
python on a small worker script (written to a temporary folder) and talks to
it in JSON lines, so the expensive steps happen once per model and every
mixed-precision candidate after them costs about a second:

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

Thread-safety: a :class:`TfliteConverter` owns one worker process; use it
from one thread. The module-level functions are safe to call concurrently
(each starts its own worker).
"""

from __future__ import annotations

import contextlib
import dataclasses

import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from quantize.errors import QuantizeError, QuantizeInputError
from quantize.mixed import first_stable, smallest_prefix

ENV_VAR = "EDGE_AGENT_ONNX2TF_VENV"
DEFAULT_ENV = Path("~/.cache/edge-agent/onnx2tf-venv")
SETUP_SCRIPT = "scripts/setup_onnx2tf.sh"
#: Where callers may cache prepared models (float + calibrated flatbuffers and
#: sensitivity rankings), keyed by the sha256 of everything that went in.
DEFAULT_CACHE = Path("~/.cache/edge-agent/tflite")

Progress = Callable[[str], None]


# --------------------------------------------------------------------------
# Finding the converter environment
# --------------------------------------------------------------------------


def find_converter_env(env: Path | str | None = None) -> Path:
    """The converter environment: ``env``, else ``$EDGE_AGENT_ONNX2TF_VENV``,
    else ``~/.cache/edge-agent/onnx2tf-venv``.

    Raises :class:`QuantizeError` (code ``converter_env_missing``) with a
    one-line message saying how to create it when it has no python.
    """
    if env is None:
        env = os.environ.get(ENV_VAR) or DEFAULT_ENV
    path = Path(env).expanduser()
    if not (path / "bin" / "python").exists():
        raise QuantizeError(
            f"the ONNX->TFLite converter environment is missing ({path}); create it with "
            f"{SETUP_SCRIPT} (needs Python >= 3.12), or point {ENV_VAR} at one",
            code="converter_env_missing",
        )
    return path


# --------------------------------------------------------------------------
# Reading a .tflite file (main environment, no interpreter needed)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    quant: tuple[float, int] | None


@dataclass(frozen=True)
class ModelInfo:
    """What a .tflite file holds: its ops (in order of first use, builtin
    names, custom ops by their custom code, e.g. ``FlexErf``), op counts and
    its input/output tensors."""

    ops: tuple[str, ...]
    op_counts: dict[str, int]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


def read_model(path: Path) -> ModelInfo:
    """Parse a .tflite flatbuffer with LiteRT's schema (no interpreter, so a
    model with Flex ops can be inspected too)."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # pragma: no cover - ai-edge-litert ships the schema
        raise QuantizeError(
            "reading .tflite files needs ai-edge-litert: pip install 'edge-agent[tflite]'",
            code="litert_missing",
        ) from None
    buf = Path(path).read_bytes()
    try:
        model = schema.Model.GetRootAs(buf, 0)
        builtin = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        codes = []
        for i in range(model.OperatorCodesLength()):
            oc = model.OperatorCodes(i)
            code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
            name = builtin.get(code, f"BUILTIN_{code}")
            if name == "CUSTOM":
                custom = oc.CustomCode()
                name = custom.decode() if custom else "CUSTOM"
            codes.append(name)
        ops: list[str] = []
        counts: dict[str, int] = {}
        for s in range(model.SubgraphsLength()):
            sub = model.Subgraphs(s)
            for o in range(sub.OperatorsLength()):
                name = codes[sub.Operators(o).OpcodeIndex()]
                if name not in counts:
                    ops.append(name)
                counts[name] = counts.get(name, 0) + 1
        main = model.Subgraphs(0)

        def tensor(index: int) -> TensorInfo:
            t = main.Tensors(index)
            q = t.Quantization()
            quant = None
            if q is not None and q.ScaleLength() > 0 and q.ScaleAsNumpy()[0] != 0:
                quant = (float(q.ScaleAsNumpy()[0]), int(q.ZeroPointAsNumpy()[0]) if q.ZeroPointLength() else 0)
            name = t.Name().decode() if t.Name() else str(index)
            return TensorInfo(name, tuple(int(d) for d in t.ShapeAsNumpy()), types.get(t.Type(), str(t.Type())), quant)

        inputs = tuple(tensor(int(i)) for i in main.InputsAsNumpy())
        outputs = tuple(tensor(int(i)) for i in main.OutputsAsNumpy())
    except QuantizeError:
        raise
    except Exception as exc:
        raise QuantizeError(f"{path}: not a readable .tflite model ({exc})", code="bad_tflite") from None
    return ModelInfo(tuple(ops), counts, inputs, outputs)


def list_ops(path: Path) -> list[str]:
    """The ops a .tflite model uses, in order of first use."""
    return list(read_model(path).ops)


def forbidden_ops(ops: Sequence[str]) -> list[str]:
    """The ops among ``ops`` that a plain LiteRT cannot run: TensorFlow
    (Flex) ops and any other custom op."""
    return [op for op in ops if op.startswith("Flex") or op == "CUSTOM" or not op.isupper() or op.startswith("BUILTIN_")]


def check_ops(ops: Sequence[str], what: str = "the TFLite model") -> None:
    """Refuse Flex/custom ops, naming them (:class:`QuantizeError`, code
    ``unsupported_ops``)."""
    bad = forbidden_ops(ops)
    if bad:
        raise QuantizeError(
            f"{what} needs ops the device's LiteRT cannot run: {', '.join(sorted(set(bad)))} "
            "(TensorFlow Flex/custom ops); refusing it",
            code="unsupported_ops",
        )


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One quantizable layer of the TFLite graph: ``name`` is its output
    tensor's name (what ``float_nodes`` takes), ``op`` its TFLite op, and
    ``index`` its position among the quantizable layers (graph order)."""

    name: str
    op: str
    index: int

    @property
    def label(self) -> str:
        """Short human label, e.g. ``#12 CONV_2D tf.nn.convolution_5``."""
        parts = [p for p in self.name.split(";") if p and not p.startswith("Const")]
        core = parts[-1].split("/")[-2] if parts and "/" in parts[-1] else (parts[-1] if parts else self.name)
        return f"#{self.index} {self.op} {core}"


@dataclass(frozen=True)
class Sensitivity:
    """How much quantizing this layer alone moves the outputs away from fp32
    (mean KL divergence of the softmax over the sensitivity samples)."""

    layer: Layer
    score: float


@dataclass(frozen=True)
class TfliteArtifact:
    """A full-integer TFLite model written by this module.

    ``input_quant``/``output_quant``: (scale, zero_point) of the int8 input
    (the normalised NHWC image) and output; ``float_nodes``: layers kept in
    float (tensor names); for a mixed-precision result ``agreement`` is what
    ``evaluate`` returned for it, ``target_met`` whether it reached the
    target, and ``trials`` every (number of float layers, agreement) tried.
    """

    path: Path
    ops: tuple[str, ...]
    input_quant: tuple[float, int]
    output_quant: tuple[float, int]
    float_nodes: tuple[str, ...] = ()
    float_layers: tuple[str, ...] = ()
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()
    input_name: str = ""
    output_name: str = ""
    op_counts: dict[str, int] = field(default_factory=dict)
    agreement: float | None = None
    target_met: bool | None = None
    trials: tuple[tuple[int, float], ...] = ()
    conversion_s: float = 0.0
    full_int8_path: Path | None = None
    """For a mixed-precision result with layers in float: the fully int8
    candidate beside it (what mixed precision started from), for comparing
    their latency."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for report.json and the manifest)."""
        return {
            "path": str(self.path),
            "ops": list(self.ops),
            "op_counts": dict(self.op_counts),
            "input": {"name": self.input_name, "shape": list(self.input_shape), "dtype": "int8", "scale": self.input_quant[0], "zero_point": self.input_quant[1]},
            "output": {"name": self.output_name, "shape": list(self.output_shape), "dtype": "int8", "scale": self.output_quant[0], "zero_point": self.output_quant[1]},
            "float_nodes": list(self.float_nodes),
            "float_layers": list(self.float_layers),
            "agreement": self.agreement,
            "target_met": self.target_met,
            "trials": [{"float_nodes": k, "agreement": a} for k, a in self.trials],
            "conversion_s": self.conversion_s,
        }


# --------------------------------------------------------------------------
# The converter session (one worker process in the converter env)
# --------------------------------------------------------------------------

_LOG_TAIL_LINES = 25


def _as_channels(value: float | Sequence[float], channels: int, what: str) -> list[float]:
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64)).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, channels)
    if arr.size != channels:
        raise QuantizeInputError(f"{what} has {arr.size} values for {channels} channels")
    if what == "std" and np.any(arr == 0):
        raise QuantizeInputError("std must not contain 0")
    return [float(v) for v in arr]


def _check_calibration(calibration: np.ndarray) -> np.ndarray:
    calib = np.asarray(calibration)
    if calib.ndim != 4 or calib.shape[0] < 1:
        raise QuantizeInputError(f"calibration data must be NHWC images (N,H,W,C), got shape {calib.shape}")
    if calib.dtype.kind != "f":
        raise QuantizeInputError(f"calibration data must be float in [0, 1], got {calib.dtype}")
    lo, hi = float(calib.min()), float(calib.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise QuantizeInputError(f"calibration data must be in [0, 1] (before mean/std), got [{lo:.3g}, {hi:.3g}]")
    return np.ascontiguousarray(calib, dtype=np.float32)


class TfliteConverter:
    """One worker process in the converter environment, holding one prepared
    model. Cheap to construct; :meth:`prepare` does the heavy work.

    Use as a context manager (or call :meth:`close`)::

        with TfliteConverter(progress=print) as conv:
            conv.prepare(onnx_path, calib_nhwc01, mean, std)
            plain = conv.quantize(out_dir / "plain.tflite")
            ranking = conv.sensitivity()

    ``cache_dir`` (optional) keeps prepared models and rankings between runs,
    keyed by the sha256 of the ONNX file, the calibration data, mean/std and
    the converter's versions. Every request has ``timeout_s``; a worker that
    fails or times out raises :class:`QuantizeError` with the tail of its log.
    """

    def __init__(
        self,
        env: Path | str | None = None,
        *,
        progress: Progress | None = None,
        cache_dir: Path | str | None = None,
        timeout_s: float = 1800.0,
    ) -> None:
        self.env = env
        self.progress = progress
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log_path: Path | None = None
        self._log_file: Any = None
        self.prepared: dict[str, Any] | None = None
        self._layers: list[Layer] | None = None

    # -- process management -------------------------------------------------

    def __enter__(self) -> "TfliteConverter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        if self._proc is not None:
            return
        env_dir = find_converter_env(self.env)
        self._tmp = tempfile.TemporaryDirectory(prefix="edge-tflite-")
        tmp = Path(self._tmp.name)
        worker = tmp / "tflite_worker.py"
        worker.write_text(_WORKER_SOURCE)
        self._log_path = tmp / "worker.log"
        self._log_file = open(self._log_path, "w")
        child_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        child_env.update(
            TF_CPP_MIN_LOG_LEVEL="3",
            TF_USE_LEGACY_KERAS="1",
            PYTHONNOUSERSITE="1",
            PYTHONUNBUFFERED="1",
            CUDA_VISIBLE_DEVICES="-1",
        )
        try:
            self._proc = subprocess.Popen(
                [str(env_dir / "bin" / "python"), str(worker)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log_file,
                text=True,
                bufsize=1,
                env=child_env,
                cwd=tmp,
            )
        except OSError as exc:
            raise QuantizeError(f"cannot start the converter ({env_dir}/bin/python): {exc}; re-create it with {SETUP_SCRIPT} --force") from None
        reader = threading.Thread(target=self._pump, args=(self._proc,), daemon=True)
        reader.start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _log_tail(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        self._log_file.flush()
        noise = ("WARNING: All log messages", "W0000", "I0000", "UserWarning", "warnings.warn")
        lines = [ln.rstrip() for ln in self._log_path.read_text(errors="replace").splitlines()]
        lines = [ln for ln in lines if ln.strip() and not any(n in ln for n in noise)]
        return "\n".join(deque(lines, maxlen=_LOG_TAIL_LINES))

    def _request(self, cmd: str, **args: Any) -> dict[str, Any]:
        self._start()
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died(cmd) from None
        deadline = time.monotonic() + self.timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill()
                raise QuantizeError(
                    f"the TFLite converter timed out after {self.timeout_s:.0f} s ({cmd}); last output:\n{self._log_tail()}",
                    code="converter_timeout",
                )
            try:
                line = self._lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                raise self._died(cmd)
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "progress" in msg:
                if self.progress:
                    self.progress(str(msg["progress"]))
                continue
            if not msg.get("ok"):
                error = msg.get("error", "unknown error")
                code = msg.get("code") or "conversion_failed"
                tail = self._log_tail()
                raise QuantizeError(f"TFLite conversion failed ({cmd}): {error}" + (f"\nconverter output:\n{tail}" if tail else ""), code=code)
            return msg

    def _died(self, cmd: str) -> QuantizeError:
        rc = self._proc.wait(timeout=10) if self._proc is not None else None
        self._proc = None
        return QuantizeError(
            f"the TFLite converter exited (code {rc}) during {cmd}; last output:\n{self._log_tail()}",
            code="conversion_failed",
        )

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=10)
            self._proc = None

    def close(self) -> None:
        """Stop the worker and remove its temporary files; safe to call twice."""
        if self._proc is not None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=10)
            except Exception:
                self._kill()
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- the work ------------------------------------------------------------

    def prepare(
        self,
        onnx_fp32: Path,
        calibration: np.ndarray,
        mean: float | Sequence[float],
        std: float | Sequence[float],
    ) -> dict[str, Any]:
        """Convert the ONNX model to a float TFLite graph and calibrate it.

        ``calibration``: NHWC float32 images in [0, 1], already resized and
        cropped like the device's preprocessing; ``mean``/``std`` are applied
        here (per channel) before calibration. Returns what the worker
        reported (input shape, float ops, timings, whether it came from the
        cache). Refuses a model whose float graph already needs Flex ops.
        """
        onnx_fp32 = Path(onnx_fp32)
        if not onnx_fp32.is_file():
            raise QuantizeInputError(f"{onnx_fp32}: no such file")
        calib = _check_calibration(calibration)
        channels = calib.shape[-1]
        mean_c, std_c = _as_channels(mean, channels, "mean"), _as_channels(std, channels, "std")
        self._start()
        assert self._tmp is not None
        calib_path = Path(self._tmp.name) / "calibration.npy"
        np.save(calib_path, calib)
        req = {
            "onnx": str(onnx_fp32.resolve()),
            "calibration": str(calib_path),
            "mean": mean_c,
            "std": std_c,
            "cache_dir": str(self.cache_dir) if self.cache_dir else None,
        }
        reply = self._request("prepare", **req)
        calib_path.unlink(missing_ok=True)
        check_ops(reply.get("float_ops", []), f"{onnx_fp32.name} converted to TFLite")
        self.prepared = reply
        self._layers = [Layer(d["name"], d["op"], d["index"]) for d in reply["layers"]]
        return reply

    def layers(self) -> list[Layer]:
        """The quantizable layers, in graph order."""
        if self._layers is None:
            raise QuantizeError("prepare() a model first")
        return list(self._layers)

    def quantize(self, out: Path, float_nodes: Sequence[str] = (), *, per_channel: bool = True) -> TfliteArtifact:
        """Write the full-integer model (int8 in and out) to ``out``, keeping
        ``float_nodes`` (layer names, see :meth:`layers`) in float; checked
        for Flex/custom ops."""
        if self.prepared is None:
            raise QuantizeError("prepare() a model first")
        by_name = {layer.name: layer for layer in self.layers()}
        unknown = [n for n in float_nodes if n not in by_name]
        if unknown:
            raise QuantizeInputError(f"unknown float node(s) {unknown[:3]} (choose among the {len(by_name)} layers of TfliteConverter.layers())")
        t0 = time.perf_counter()
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(out.name + ".part")
        self._request("quantize", out=str(tmp_out.resolve()), float_nodes=list(float_nodes), per_channel=per_channel)
        try:
            info = read_model(tmp_out)
            check_ops(info.ops, out.name)
            inp, outp = info.inputs[0], info.outputs[0]
            if inp.dtype != "int8" or outp.dtype != "int8" or inp.quant is None or outp.quant is None:
                raise QuantizeError(f"{out.name}: expected int8 input and output, got {inp.dtype} -> {outp.dtype}")
        except BaseException:
            tmp_out.unlink(missing_ok=True)
            raise
        os.replace(tmp_out, out)
        return TfliteArtifact(
            path=out,
            ops=info.ops,
            input_quant=inp.quant,
            output_quant=outp.quant,
            float_nodes=tuple(float_nodes),
            float_layers=tuple(by_name[n].label for n in float_nodes),
            input_shape=inp.shape,
            output_shape=outp.shape,
            input_name=inp.name,
            output_name=outp.name,
            op_counts=info.op_counts,
            conversion_s=round(time.perf_counter() - t0 + float(self.prepared.get("seconds", 0.0)), 1),
        )

    def export_float(self, out: Path) -> Path:
        """Write the float32 TFLite model (same graph, for comparisons)."""
        if self.prepared is None:
            raise QuantizeError("prepare() a model first")
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        self._request("float", out=str(Path(out).resolve()))
        return out

    def sensitivity(
        self,
        *,
        method: Literal["isolation", "debugger"] = "isolation",
        samples: int = 32,
    ) -> list[Sensitivity]:
        """Rank the layers by how much their quantization hurts, most harmful
        first, on up to ``samples`` calibration images (never evaluation data).

        ``isolation`` (default): quantize each layer alone (the rest float)
        and measure KL(fp32 || candidate) of the softmax outputs — one cheap
        quantization and a few inferences per layer (about a minute for
        MobileNetV2). ``debugger``: TensorFlow's QuantizationDebugger layer
        statistics (NumericVerify), ranked by the layer's noise-to-signal
        ratio ``||f - q||² / ||f||²``; faster but a much weaker predictor of
        what floating a layer buys (measured on MobileNetV2: keeping the top
        16 in float gave 84 % agreement ranked by isolation, 79 % by
        noise-to-signal and 62 % by the debugger's rmse/scale).
        """
        if self.prepared is None:
            raise QuantizeError("prepare() a model first")
        reply = self._request("sensitivity", method=method, samples=samples)
        by_name = {layer.name: layer for layer in self.layers()}
        return [Sensitivity(by_name[name], float(score)) for name, score in reply["ranking"] if name in by_name]

    def search(
        self,
        out: Path,
        *,
        evaluate: Callable[[Path], float],
        target: float,
        max_float_nodes: int = 20,
        per_channel: bool = True,
        ranking: Sequence[Sensitivity] | None = None,
        method: Literal["isolation", "debugger"] = "isolation",
        rule: Literal["first", "stable"] = "first",
    ) -> TfliteArtifact:
        """Keep the fewest most sensitive layers in float until
        ``evaluate(candidate.tflite)`` reaches ``target``.

        ``rule="stable"``: try 0, 1, 2, ... layers in turn and take the first
        count whose agreement reaches the target *and* whose next count does
        too (:func:`quantize.mixed.first_stable`), so that a count that
        touches the target by luck on these pictures is passed over.

        Tries 0 (plain full int8), then 1, 2, 4, ... up to
        ``max_float_nodes`` most sensitive layers, then bisects between the
        last miss and the first hit (about 2·log2(max_float_nodes) + 1
        candidates, each a quantization of ~1 s plus ``evaluate``). When no
        candidate reaches the target the one with the best agreement (fewest
        float layers on a tie) is written, with ``target_met=False``.
        ``ranking`` defaults to :meth:`sensitivity` with ``method``, computed
        only when plain int8 misses the target.
        """
        out = Path(out)
        order: list[str] = []
        t0 = time.perf_counter()
        tried: dict[int, float] = {}
        assert self._tmp is not None
        work = Path(self._tmp.name)

        full_int8 = out.with_name(f"{out.stem}.full_int8.tflite")

        def agree(k: int) -> float:
            if k not in tried:
                cand = self.quantize(work / f"candidate_{k}.tflite", order[:k], per_channel=per_channel)
                tried[k] = float(evaluate(cand.path))
                if k == 0:
                    shutil.move(str(cand.path), full_int8)
                else:
                    cand.path.unlink(missing_ok=True)
                if self.progress:
                    self.progress(f"mixed precision: {k} layer(s) in float -> agreement {tried[k]:.3f}")
            return tried[k]

        if agree(0) >= target:
            best_k, met = 0, True
        else:
            if ranking is None:
                ranking = self.sensitivity(method=method)
            order = [s.layer.name for s in ranking][: max(0, max_float_nodes)]
            if rule == "stable":
                best_k, met = first_stable(len(order), agree, target)
            else:
                best_k, met = smallest_prefix(len(order), agree, target)
        result = self.quantize(out, order[:best_k], per_channel=per_channel)
        if best_k == 0:
            full_int8.unlink(missing_ok=True)
        return dataclasses.replace(
            result,
            agreement=tried[best_k],
            target_met=met,
            trials=tuple(tried.items()),
            conversion_s=round(result.conversion_s + time.perf_counter() - t0, 1),
            full_int8_path=full_int8 if best_k and full_int8.exists() else None,
        )


# --------------------------------------------------------------------------
# One-call API
# --------------------------------------------------------------------------


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
) -> TfliteArtifact:
    """Like :func:`convert_int8`, then automatic mixed precision: rank the
    layers by sensitivity and keep the fewest most sensitive ones in float
    (input and output stay int8) until ``evaluate(path) >= target``.

    ``evaluate`` runs a candidate .tflite (in this environment) and returns
    its top-1 agreement with fp32; give it data that is not the evaluation
    set you report on. The result's ``float_nodes``/``float_layers`` say what
    was kept in float, ``agreement``/``target_met``/``trials`` how the search
    went. See :meth:`TfliteConverter.search`.
    """
    with TfliteConverter(env, progress=progress, cache_dir=cache_dir) as conv:
        conv.prepare(onnx_fp32, calibration, mean, std)
        return conv.search(
            out, evaluate=evaluate, target=target, max_float_nodes=max_float_nodes, per_channel=per_channel, method=method, rule=rule
        )


# --------------------------------------------------------------------------
# The worker (runs in the converter env: Python >= 3.12, TensorFlow, onnx2tf)
# --------------------------------------------------------------------------

_WORKER_SOURCE = r'''
"""edge-agent TFLite worker: JSON requests on stdin, JSON replies on stdout.

Everything that libraries print goes to stderr (the caller's log file); the
protocol uses a private copy of the original stdout.
"""
import hashlib, json, os, sys, time, traceback

PROTO = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr
VERSION = "1"


def send(**msg):
    PROTO.write(json.dumps(msg) + "\n")
    PROTO.flush()


def progress(text):
    send(progress=text)


class Refused(Exception):
    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


import numpy as np

STATE = {}


def interpreter(content):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf
        Interpreter = tf.lite.Interpreter
    it = Interpreter(model_content=content, num_threads=max(1, min(4, os.cpu_count() or 1)))
    it.allocate_tensors()
    return it


def run_model(content, data):
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


def op_names(content):
    it = interpreter_noalloc(content)
    names = []
    for d in it._get_ops_details():
        if d["op_name"] not in names:
            names.append(d["op_name"])
    return names


def interpreter_noalloc(content):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf
        Interpreter = tf.lite.Interpreter
    return Interpreter(model_content=content)


def versions():
    from importlib.metadata import version
    out = {}
    for dist in ("onnx2tf", "tensorflow", "onnxsim", "onnx"):
        try:
            out[dist] = version(dist)
        except Exception:
            out[dist] = "?"
    return out


def quantizable_layers(calibrated):
    """(name, op) of each layer the quantizer can keep in float, graph order:
    the inputs of the NumericVerify ops of the debug model, named the way
    QuantizationDebugger names them (what denylisted_nodes takes)."""
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
        # "NumericVerify/<tensor name>[digit]:<index>", as the debugger parses it
        base, _ = name.rsplit(":", 1)
        base = base[len("NumericVerify") + 1:]
        if base and base[-1].isdigit():
            base = base[:-1]
        layers.append({"name": base, "op": defining.get(q_idx, "?"), "tensor": q_idx})
    layers.sort(key=lambda d: d["tensor"])
    return [{"name": d["name"], "op": d["op"], "index": k} for k, d in enumerate(layers)]


def prepare(req):
    t0 = time.perf_counter()
    calib01 = np.load(req["calibration"])
    mean = np.asarray(req["mean"], np.float32)
    std = np.asarray(req["std"], np.float32)
    key = None
    cache = None
    if req.get("cache_dir"):
        h = hashlib.sha256()
        with open(req["onnx"], "rb") as f:
            h.update(f.read())
        h.update(calib01.tobytes()); h.update(str(calib01.shape).encode())
        h.update(json.dumps([req["mean"], req["std"], versions(), VERSION]).encode())
        key = h.hexdigest()[:32]
        cache = os.path.join(req["cache_dir"], "prepared", key)
    n, H, W, C = calib01.shape
    if cache and all(os.path.exists(os.path.join(cache, f)) for f in ("float.tflite", "calibrated.tflite", "meta.json")):
        with open(os.path.join(cache, "float.tflite"), "rb") as f:
            float_model = f.read()
        with open(os.path.join(cache, "calibrated.tflite"), "rb") as f:
            calibrated = f.read()
        with open(os.path.join(cache, "meta.json")) as f:
            meta = json.load(f)
        progress("prepared model taken from the cache")
        cached = True
    else:
        cached = False
        import onnx, onnxsim
        model = onnx.load(req["onnx"])
        inits = {i.name for i in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in inits]
        if len(inputs) != 1:
            raise Refused(f"the model has {len(inputs)} inputs; the TFLite path handles one image input", "bad_input")
        dims = inputs[0].type.tensor_type.shape.dim
        if len(dims) != 4:
            raise Refused(f"input {inputs[0].name!r} has rank {len(dims)}; expected an image [N,C,H,W]", "bad_input")
        d = [x.dim_value if x.HasField("dim_value") and x.dim_value > 0 else None for x in dims]
        if d[1] in (C, None) and d[3] != C:
            shape, layout = [1, C, H, W], "nchw"
        elif d[3] == C:
            shape, layout = [1, H, W, C], "nhwc"
        else:
            shape, layout = [1, C, H, W], "nchw"
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
        data = ((calib01 - mean) / std).astype(np.float32)
        if tf_layout == "nchw":
            data = data.transpose(0, 3, 1, 2)
        progress(f"calibrating on {n} images")
        from tensorflow.lite.python.optimize import calibrator as _calibrator

        def gen():
            for x in data:
                yield [x[None]]

        calibrated = _calibrator.Calibrator(_calibrator.add_intermediate_tensors(float_model)).calibrate(gen)
        meta = {"input_shape": in_shape, "layout": tf_layout, "float_ops": float_ops,
                "layers": quantizable_layers(calibrated), "versions": versions()}
        if cache:
            os.makedirs(cache, exist_ok=True)
            for fname, blob in (("float.tflite", float_model), ("calibrated.tflite", calibrated)):
                with open(os.path.join(cache, fname + ".tmp"), "wb") as f:
                    f.write(blob)
                os.replace(os.path.join(cache, fname + ".tmp"), os.path.join(cache, fname))
            with open(os.path.join(cache, "meta.json.tmp"), "w") as f:
                json.dump(meta, f)
            os.replace(os.path.join(cache, "meta.json.tmp"), os.path.join(cache, "meta.json"))
    data = ((calib01 - mean) / std).astype(np.float32)
    if meta["layout"] == "nchw":
        data = data.transpose(0, 3, 1, 2)
    STATE.update(float=float_model, calibrated=calibrated, data=data, meta=meta, cache=cache)
    return {**meta, "cached": cached, "key": key, "seconds": round(time.perf_counter() - t0, 1)}


def quantize_bytes(float_nodes, per_channel=True, int8_io=True):
    import tensorflow as tf
    from tensorflow.lite.python import convert
    kwargs = dict(disable_per_channel=not per_channel, denylisted_nodes=list(float_nodes) or None)
    if int8_io:
        kwargs.update(input_data_type=tf.int8, output_data_type=tf.int8)
    return convert.mlir_quantize(STATE["calibrated"], **kwargs)


def quantize(req):
    blob = quantize_bytes(req.get("float_nodes") or [], req.get("per_channel", True))
    with open(req["out"], "wb") as f:
        f.write(blob)
    return {"bytes": len(blob)}


def export_float(req):
    with open(req["out"], "wb") as f:
        f.write(STATE["float"])
    return {"bytes": len(STATE["float"])}


def log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl(ref, cand):
    lp, lq = log_softmax(ref), log_softmax(cand)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))


def sensitivity(req):
    method = req.get("method", "isolation")
    samples = max(1, int(req.get("samples", 32)))
    cache_file = None
    if STATE.get("cache"):
        cache_file = os.path.join(STATE["cache"], f"sensitivity-{method}-{samples}.json")
        if os.path.exists(cache_file):
            with open(cache_file) as f:
                progress("sensitivity ranking taken from the cache")
                return {"ranking": json.load(f)}
    data = STATE["data"]
    idx = np.linspace(0, len(data) - 1, min(samples, len(data))).round().astype(int)
    sub = data[np.unique(idx)]
    names = [layer["name"] for layer in STATE["meta"]["layers"]]
    if method == "isolation":
        ref = run_model(STATE["float"], sub)
        scores = []
        for k, name in enumerate(names):
            cand = quantize_bytes([n for n in names if n != name], int8_io=False)
            scores.append((name, kl(ref, run_model(cand, sub))))
            if k % 8 == 7 or k == len(names) - 1:
                progress(f"sensitivity: {k + 1}/{len(names)} layers")
    elif method == "debugger":
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
        by_layer = {}
        for verify_name, metrics in dbg.layer_statistics.items():
            base = verify_name.rsplit(":", 1)[0][len("NumericVerify") + 1:]
            if base and base[-1].isdigit():
                base = base[:-1]
            by_layer[base] = float(metrics["nsr"])
        scores = [(name, by_layer.get(name, 0.0)) for name in names]
    else:
        raise Refused(f"unknown sensitivity method {method!r}", "bad_input")
    ranking = sorted(scores, key=lambda item: -item[1])
    if cache_file:
        with open(cache_file + ".tmp", "w") as f:
            json.dump(ranking, f)
        os.replace(cache_file + ".tmp", cache_file)
    return {"ranking": ranking}


HANDLERS = {"prepare": prepare, "quantize": quantize, "float": export_float, "sensitivity": sensitivity}


def main():
    for line in sys.stdin:
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


main()
'''
