"""The protocol every runtime backend implements, and the input conversion
they share. Backends import this module, never the package's ``__init__``
(which imports them), so the seam has one direction."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Sequence

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
    def close(self) -> None:
        """Release the model; safe to call twice."""

    def warm_up(self) -> None:
        spec = self.inputs[0]
        shape = [d if d is not None else 1 for d in spec.shape]
        dtype = np.float32 if spec.quantization is not None else np.dtype(spec.dtype)
        self.infer(np.zeros(shape, dtype=dtype))


def quantize(x: np.ndarray, q: Quantization, dtype: np.dtype) -> np.ndarray:
    """Affine quantization ``q = round(x / scale) + zero_point``, saturated."""
    info = np.iinfo(dtype)
    return np.clip(np.round(x / q.scale) + q.zero_point, info.min, info.max).astype(dtype)


def prepare_input(tensor: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Bring a preprocessed float tensor to the model's input type: quantize
    it when the input is int8/uint8 with a scale/zero-point, else cast."""
    dtype = np.dtype(spec.dtype)
    if tensor.dtype == dtype:
        return tensor
    if dtype.kind in "iu" and tensor.dtype.kind == "f" and spec.quantization is not None:
        return quantize(tensor, spec.quantization, dtype)
    return tensor.astype(dtype)
