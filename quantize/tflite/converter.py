"""The converter driver: :class:`TfliteConverter` holds one worker
(:mod:`quantize.tflite.session`) with one prepared model and turns it into
full-integer TFLite models: plain, with chosen layers left in float, or with
as few float layers as reach an agreement target (:meth:`TfliteConverter.search`,
the mixed-precision search, on a sensitivity ranking).

It checks what goes in (calibration images, mean/std) before any work, and
every model that comes out: int8 input and output, no Flex or custom op
(:func:`quantize.tflite.flatbuffer.check_ops`).

Thread-safety: a :class:`TfliteConverter` owns one worker process; use it
from one thread.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from quantize.errors import QuantizeError, QuantizeInputError
from quantize.mixed import first_stable, smallest_prefix
from quantize.tflite.flatbuffer import check_ops, read_model
from quantize.tflite.results import Layer, Sensitivity, TfliteArtifact
from quantize.tflite.session import Progress, WorkerProcess


def _as_channels(value: float | Sequence[float], channels: int, what: str) -> list[float]:
    """``value`` (one number, or one per channel) as one float per channel."""
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64)).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, channels)
    if arr.size != channels:
        raise QuantizeInputError(f"{what} has {arr.size} values for {channels} channels")
    if what == "std" and np.any(arr == 0):
        raise QuantizeInputError("std must not contain 0")
    return [float(v) for v in arr]


def _check_calibration(calibration: np.ndarray) -> np.ndarray:
    """The calibration images as contiguous float32 NHWC in [0, 1], or :class:`QuantizeInputError`."""
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
        self._worker = WorkerProcess(env, progress=progress, timeout_s=timeout_s)
        self.prepared: dict[str, Any] | None = None
        self._layers: list[Layer] | None = None

    def __enter__(self) -> "TfliteConverter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker and remove its temporary files; safe to call twice."""
        self._worker.close()

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
        self._worker.start()
        calib_path = self._worker.workdir / "calibration.npy"
        np.save(calib_path, calib)
        req = {
            "onnx": str(onnx_fp32.resolve()),
            "calibration": str(calib_path),
            "mean": mean_c,
            "std": std_c,
            "cache_dir": str(self.cache_dir) if self.cache_dir else None,
        }
        reply = self._worker.request("prepare", **req)
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
        self._worker.request("quantize", out=str(tmp_out.resolve()), float_nodes=list(float_nodes), per_channel=per_channel)
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
        self._worker.request("float", out=str(Path(out).resolve()))
        return out

    def sensitivity(
        self,
        *,
        method: Literal["isolation", "debugger"] = "isolation",
        samples: int = 32,
        score: Literal["kl", "nsr"] = "kl",
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
        noise-to-signal and 62 % by the debugger's rmse/scale). ``score``
        (isolation): ``kl`` for class logits, ``nsr`` (mean squared error over
        the float output's variance) for outputs that are not, a detector's.
        """
        if self.prepared is None:
            raise QuantizeError("prepare() a model first")
        reply = self._worker.request("sensitivity", method=method, samples=samples, score=score)
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
        score: Literal["kl", "nsr"] = "kl",
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
        work = self._worker.workdir

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
                ranking = self.sensitivity(method=method, score=score)
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
