"""The protocol every runtime backend implements, and the input conversion
they share. Backends import this module, never the package's ``__init__``
(which imports them), so the seam has one direction."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from edge_agent.bundles.manifest import Quantization, TensorSpec


class Runtime(abc.ABC):
    """One loaded model.

    ``infer`` takes the single input tensor already shaped and typed per the
    manifest (int8 inputs are quantized here when the spec says so) and
    returns the outputs as float32 arrays in the manifest's output order,
    dequantized where the model emits int8. Thread-safety: ``infer`` may be
    called from several threads; backends that need it serialise internally.
    """

    def __init__(
        self,
        model_path: Path,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        *,
        threads: int = 2,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        self.model_path = Path(model_path)
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.threads = threads
        self.providers = list(providers)

    @abc.abstractmethod
    def load(self) -> None:
        """Create the session/interpreter and run one warm-up inference."""

    @abc.abstractmethod
    def infer(self, tensor: np.ndarray) -> list[np.ndarray]:
        """Run one input; raises InferenceError."""

    @abc.abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run named inputs (every input of the model, by its name; a
        dynamic dimension takes any size) and give back every output by
        name, in the manifest's order and the model's own dtypes
        (dequantized to float32 where the model emits quantized ints).
        Float inputs of a quantized tensor are quantized here. Raises
        InferenceError."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the model; safe to call twice."""

    def warm_up(self) -> None:
        """One inference on zeros (dynamic dimensions at 1), every input fed."""
        if len(self.inputs) == 1 and self.inputs[0].dtype != "string":
            self.infer(warm_up_tensor(self.inputs[0]))
        else:
            self.run({spec.name: warm_up_tensor(spec) for spec in self.inputs})


def warm_up_tensor(spec: TensorSpec) -> np.ndarray:
    """Zeros (empty strings) of ``spec``'s shape, dynamic dimensions at 1."""
    shape = [d if d is not None else 1 for d in spec.shape]
    if spec.dtype == "string":
        return np.full(shape, "", dtype=object)
    dtype = np.float32 if spec.quantization is not None else np.dtype(spec.dtype)
    return np.zeros(shape, dtype=dtype)


def quantize(x: np.ndarray, q: Quantization, dtype: np.dtype) -> np.ndarray:
    """Affine quantization ``q = round(x / scale) + zero_point``, saturated."""
    info = np.iinfo(dtype)
    return np.clip(np.round(x / q.scale) + q.zero_point, info.min, info.max).astype(dtype)


def prepare_input(tensor: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Bring a preprocessed float tensor to the model's input type: quantize
    it when the input is int8/uint8 with a scale/zero-point, else cast."""
    if spec.dtype == "string":
        return tensor if tensor.dtype == object else tensor.astype(object)
    dtype = np.dtype(spec.dtype)
    if tensor.dtype == dtype:
        return tensor
    if dtype.kind in "iu" and tensor.dtype.kind == "f" and spec.quantization is not None:
        return quantize(tensor, spec.quantization, dtype)
    return tensor.astype(dtype)
