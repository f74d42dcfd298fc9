"""Test doubles for the agent, shipped in the package so that tests of any
component (and users' own tests) can use the same ones.

* :class:`SlowRuntime` wraps a real :class:`~edge_agent.runtimes.Runtime` and
  sleeps a fixed time in every inference: a stand-in for a slow device, to
  exercise frame skipping and rate limits with real outputs.
* :func:`slowed` returns a copy of a :class:`~edge_agent.models.manager.LoadedModel`
  whose runtime is a :class:`SlowRuntime`.
* :class:`StaticModels` hands out fixed loaded models through the same
  ``acquire(name)`` context manager as :class:`~edge_agent.models.manager.ModelManager`,
  so a :class:`~edge_agent.pipeline.SourceWorker` can run without a store.
* :class:`RecordingSink` keeps every result a pipeline emits.
* :func:`tiny_onnx_classifier` writes a small ONNX classifier built in code
  (needs the ``onnx`` package, imported only when called).

Nothing here is used by the agent itself.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from edge_agent.errors import ModelNotAvailable
from edge_agent.runtimes import Runtime

if TYPE_CHECKING:
    from edge_agent.models.manager import LoadedModel


class SlowRuntime(Runtime):
    """A real runtime that takes ``delay_s`` longer per inference.

    The sleep happens before the wrapped ``infer``, so outputs are the real
    model's. ``calls`` counts inferences (warm-up excluded: ``load`` is passed
    straight through). Thread-safe as far as the wrapped runtime is.
    """

    def __init__(self, inner: Runtime, delay_s: float) -> None:
        super().__init__(
            inner.model_path, inner.inputs, inner.outputs, threads=inner.threads, providers=inner.providers
        )
        if delay_s < 0:
            raise ValueError("delay_s must not be negative")
        self.inner = inner
        self.delay_s = delay_s
        self.calls = 0
        self._lock = threading.Lock()

    def load(self) -> None:
        self.inner.load()

    def infer(self, tensor: np.ndarray) -> list[np.ndarray]:
        time.sleep(self.delay_s)
        with self._lock:
            self.calls += 1
        return self.inner.infer(tensor)

    def close(self) -> None:
        self.inner.close()


def slowed(model: "LoadedModel", delay_s: float) -> "LoadedModel":
    """A copy of ``model`` that sleeps ``delay_s`` in every inference (the
    runtime is shared with the original, not reloaded)."""
    return dataclasses.replace(model, runtime=SlowRuntime(model.runtime, delay_s), refs=0)


class StaticModels:
    """A fixed set of loaded models behind ``acquire(name)``, like a
    ModelManager that never changes version. Counts acquisitions."""

    def __init__(self, *models: "LoadedModel") -> None:
        self._models = {m.name: m for m in models}
        self.acquired = 0

    @contextmanager
    def acquire(self, name: str, label: str | None = None) -> Iterator["LoadedModel"]:
        model = self._models.get(name)
        if model is None:
            raise ModelNotAvailable(f"model {name} is not loaded")
        self.acquired += 1
        yield model


class RecordingSink:
    """Keeps ``(source, result, monotonic time)`` for every emitted result.
    Thread-safe; ``results`` returns a snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[str, dict[str, Any], float]] = []

    def emit(self, source: str, result: dict[str, Any]) -> None:
        with self._lock:
            self._items.append((source, result, time.monotonic()))

    @property
    def items(self) -> list[tuple[str, dict[str, Any], float]]:
        with self._lock:
            return list(self._items)

    @property
    def results(self) -> list[dict[str, Any]]:
        return [r for _, r, _ in self.items]


def tiny_onnx_classifier(
    path: Path | str,
    *,
    size: tuple[int | str, int | str] = (8, 8),
    classes: int = 4,
    seed: int = 0,
) -> Path:
    """Write a Conv(3x3) -> GlobalAveragePool -> Flatten classifier taking
    float32 ``[1, 3, H, W]`` (``size`` is (W, H); a string makes that
    dimension dynamic) and emitting logits ``[1, classes]``. Deterministic
    for a given ``seed``. Returns ``path``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    width, height = size
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((classes, 3, 3, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "B")
    nodes = [
        helper.make_node("Conv", ["input", "W", "B"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["conv"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime the agent supports
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path
