"""ONNX Runtime backend."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from edge_agent.bundles.manifest import TensorSpec
from edge_agent.errors import BundleError, InferenceError, ModelLoadError
from edge_agent.runtimes.base import Runtime, prepare_input

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(double)": "float64",
    "tensor(int16)": "int16",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}


def _spec(arg: "ort.NodeArg") -> TensorSpec:
    shape = [d if isinstance(d, int) and d > 0 else None for d in arg.shape]
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise BundleError(f"tensor {arg.name!r} has unsupported type {arg.type}", code="unsupported_model")
    return TensorSpec(name=arg.name, shape=shape, dtype=dtype)


class OnnxRuntime(Runtime):
    """An ``onnxruntime.InferenceSession``; ``run`` is thread-safe in ORT.

    ``threads`` sets intra-op threads; inter-op is 1 (sequential execution),
    which is what a small device wants.
    """

    _session: "ort.InferenceSession | None" = None

    @staticmethod
    def describe(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
        session = OnnxRuntime._open(Path(path), threads=1, providers=["CPUExecutionProvider"])
        return [_spec(a) for a in session.get_inputs()], [_spec(a) for a in session.get_outputs()]

    @staticmethod
    def metadata(path: Path) -> dict[str, str]:
        """The model's metadata properties (Ultralytics exports carry ``names``)."""
        session = OnnxRuntime._open(Path(path), threads=1, providers=["CPUExecutionProvider"])
        return dict(session.get_modelmeta().custom_metadata_map)

    @staticmethod
    def _open(path: Path, *, threads: int, providers: list[str]) -> "ort.InferenceSession":
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available]
        if not chosen:
            raise ModelLoadError(
                f"none of the providers {providers} is available here (available: {sorted(available)})",
                code="provider_unavailable",
            )
        try:
            return ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise ModelLoadError(f"onnxruntime cannot load {path.name}: {exc}") from None

    def load(self) -> None:
        self._session = self._open(self.model_path, threads=self.threads, providers=self.providers)
        used = self._session.get_providers()
        if used[0] != self.providers[0]:
            log.warning("%s: %s is not usable here; running on %s", self.model_path.name, self.providers[0], used[0])
        else:
            log.info("%s: running on %s with %d thread(s)", self.model_path.name, used[0], self.threads)
        self._input_name = self._session.get_inputs()[0].name
        self._input = self.inputs[0]
        self._output_names = [o.name for o in self.outputs]
        self._specs = {spec.name: spec for spec in self.inputs}
        self.warm_up()

    def infer(self, tensor: np.ndarray) -> list[np.ndarray]:
        if self._session is None:
            raise InferenceError("model is not loaded")
        tensor = prepare_input(tensor, self._input)
        try:
            outs = self._session.run(self._output_names, {self._input_name: tensor})
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed on {self.model_path.name}: {exc}") from None
        return [np.asarray(o, dtype=np.float32) for o in outs]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise InferenceError("model is not loaded")
        feeds = {}
        for name, tensor in inputs.items():
            spec = self._specs.get(name)
            feeds[name] = prepare_input(tensor, spec) if spec is not None else tensor
        try:
            outs = self._session.run(self._output_names, feeds)
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed on {self.model_path.name}: {exc}") from None
        return {name: np.asarray(out) for name, out in zip(self._output_names, outs)}

    def close(self) -> None:
        self._session = None
