"""LiteRT (TensorFlow Lite) backend.

Imports ``ai_edge_litert`` and falls back to ``tflite_runtime`` where only that
is installed (older Pi images). int8/uint8 inputs are quantized from the
manifest's scale/zero-point; quantized outputs are dequantized, so callers
always see float32.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edge_agent.bundles.manifest import Quantization, TensorSpec
from edge_agent.errors import InferenceError, ModelLoadError, RuntimeUnavailable
from edge_agent.runtimes.base import Runtime, prepare_input, quantize  # noqa: F401 (quantize re-exported)


def interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise RuntimeUnavailable(
                "this bundle needs a TFLite runtime, and neither ai-edge-litert nor tflite-runtime is "
                "installed: pip install 'edge-agent[tflite]'"
            ) from None
    return Interpreter


def _spec(detail: dict[str, Any]) -> TensorSpec:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    dtype = np.dtype(detail["dtype"]).name
    if np.dtype(detail["dtype"]).kind in "OSU":
        dtype = "string"
    quant = Quantization(scale=float(scale), zero_point=int(zero_point)) if scale else None
    shape = [int(d) if d > 0 else None for d in detail.get("shape_signature", detail["shape"])]
    return TensorSpec(name=detail["name"], shape=shape, dtype=dtype, quantization=quant)


class LiteRTRuntime(Runtime):
    """A TFLite ``Interpreter``. Interpreters are not thread-safe: ``infer``
    holds a lock, so sources sharing this model take turns."""

    _interp: Any = None

    @staticmethod
    def describe(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
        interp = LiteRTRuntime._open(Path(path), threads=1)
        return [_spec(d) for d in interp.get_input_details()], [_spec(d) for d in interp.get_output_details()]

    @staticmethod
    def _open(path: Path, *, threads: int) -> Any:
        cls = interpreter_class()
        try:
            interp = cls(model_path=str(path), num_threads=threads)
            interp.allocate_tensors()
        except Exception as exc:
            raise ModelLoadError(f"LiteRT cannot load {path.name}: {exc}") from None
        return interp

    def load(self) -> None:
        self._lock = threading.Lock()
        self._interp = self._open(self.model_path, threads=self.threads)
        details = self._interp.get_input_details()
        self._in = details[0]
        by_name = {d["name"]: d for d in self._interp.get_output_details()}
        try:
            self._out = [by_name[o.name] for o in self.outputs]
        except KeyError as exc:
            raise ModelLoadError(f"{self.model_path.name}: manifest names output {exc} the model lacks") from None
        # The interpreter's own quant params are the truth; the manifest's are
        # used where the interpreter reports none.
        manifest = {spec.name: spec for spec in self.inputs}
        self._inputs: dict[str, tuple[dict[str, Any], TensorSpec]] = {}
        for k, detail in enumerate(details):
            actual = _spec(detail)
            declared = manifest.get(detail["name"]) or (self.inputs[0] if k == 0 else None)
            quant = actual.quantization or (declared.quantization if declared is not None else None)
            self._inputs[detail["name"]] = (detail, actual.model_copy(update={"quantization": quant}))
        self._in_spec = self._inputs[self._in["name"]][1]
        self._shapes = {d["name"]: tuple(int(x) for x in d["shape"]) for d in details}  # as allocated now
        self.warm_up()

    def infer(self, tensor: np.ndarray) -> list[np.ndarray]:
        outs = self.run({self._in["name"]: tensor})
        return [np.asarray(outs[d["name"]], dtype=np.float32) for d in self._out]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named inputs in, every output out. An input of another shape than
        the interpreter's tensor (a batch on a dynamic dimension) resizes
        it first, and the next call of another shape resizes it again."""
        if self._interp is None:
            raise InferenceError("model is not loaded")
        try:
            prepared = {}
            for name, tensor in inputs.items():
                detail, spec = self._inputs[name]
                prepared[name] = (detail, prepare_input(tensor, spec))
        except KeyError as exc:
            raise InferenceError(f"{self.model_path.name} has no input {exc}") from None
        try:
            with self._lock:
                resized = False
                for detail, tensor in prepared.values():
                    if self._shapes[detail["name"]] != tensor.shape:
                        self._interp.resize_tensor_input(detail["index"], list(tensor.shape), strict=True)
                        self._shapes[detail["name"]] = tensor.shape
                        resized = True
                if resized:
                    self._interp.allocate_tensors()
                for detail, tensor in prepared.values():
                    self._interp.set_tensor(detail["index"], tensor)
                self._interp.invoke()
                raw = [(d, self._interp.get_tensor(d["index"])) for d in self._out]
        except Exception as exc:
            raise InferenceError(f"LiteRT failed on {self.model_path.name}: {exc}") from None
        outs = {}
        for detail, value in raw:
            scale, zero_point = detail.get("quantization", (0.0, 0))
            if value.dtype.kind in "iu" and scale:
                value = (value.astype(np.float32) - zero_point) * scale
            outs[detail["name"]] = value
        return outs

    def close(self) -> None:
        self._interp = None
