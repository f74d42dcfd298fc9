"""The model manager: loads models from the store and hands them out per frame.

Following TF Serving's ServableHandle rule, the pipeline never keeps a model
between frames: it calls :meth:`ModelManager.acquire` for each frame and
releases the model when the frame is done, so a later version can be swapped
in between two frames and the old one closed once nothing holds it.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from edge_agent.bundle import Bundle, open_bundle
from edge_agent.config import ModelConfig
from edge_agent.errors import EdgeAgentError, ModelNotAvailable
from edge_agent.manifest import Manifest, Preprocessing, TensorSpec
from edge_agent.models.store import ModelStore
from edge_agent.postprocess import Classifier, Detector, make_postprocessor
from edge_agent.preprocess import Preprocessor
from edge_agent.runtimes import Runtime, create_runtime

log = logging.getLogger(__name__)


@dataclass
class Inference:
    """What one frame produced: the task part of the result plus timings."""

    payload: dict[str, Any]
    latency_ms: float
    infer_ms: float


def concrete_input(spec: TensorSpec, pre: Preprocessing) -> TensorSpec:
    """The input spec with dynamic dimensions filled in from the preprocessing
    (batch 1, the configured size), so warm-up runs on a real shape."""
    if len(spec.shape) != 4 or all(d is not None for d in spec.shape):
        return spec
    w, h = pre.size
    channels = 1 if pre.color == "gray" else 3
    filled = [1, channels, h, w] if pre.layout == "nchw" else [1, h, w, channels]
    shape = [d if d is not None else f for d, f in zip(spec.shape, filled)]
    return spec.model_copy(update={"shape": shape})


@dataclass
class LoadedModel:
    """A model version ready to serve: runtime, pre- and postprocessing.

    ``process`` is thread-safe (the runtime serialises where it must).
    """

    name: str
    version: int
    manifest: Manifest
    runtime: Runtime
    preprocess: Preprocessor
    postprocess: Classifier | Detector
    refs: int = field(default=0, repr=False)

    @classmethod
    def load(cls, bundle: Bundle, cfg: ModelConfig) -> "LoadedModel":
        m = bundle.manifest
        inputs = [concrete_input(m.inputs[0], m.preprocessing)]
        runtime = create_runtime(
            m.runtime, bundle.model_path, inputs, m.outputs, threads=cfg.threads, providers=cfg.providers
        )
        runtime.load()
        return cls(
            name=m.name,
            version=m.version,
            manifest=m,
            runtime=runtime,
            preprocess=Preprocessor(m.preprocessing, m.inputs[0]),
            postprocess=make_postprocessor(m, bundle.labels()),
        )

    def process(self, frame: np.ndarray, *, top_k: int | None = None, threshold: float | None = None) -> Inference:
        t0 = time.perf_counter()
        tensor, transform = self.preprocess(frame)
        t1 = time.perf_counter()
        outputs = self.runtime.infer(tensor)
        t2 = time.perf_counter()
        payload = self.postprocess(outputs, transform, top_k=top_k, threshold=threshold)
        t3 = time.perf_counter()
        return Inference(payload, latency_ms=(t3 - t0) * 1000.0, infer_ms=(t2 - t1) * 1000.0)


class ModelManager:
    """Owns the loaded models. ``start`` installs configured bundles into an
    empty store and loads the newest installed version of each model."""

    def __init__(self, store: ModelStore, configs: list[ModelConfig]) -> None:
        self.store = store
        self.configs = {c.name: c for c in configs}
        self._lock = threading.Condition()
        self._active: dict[str, LoadedModel] = {}

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        for cfg in self.configs.values():
            self._load_initial(cfg)

    def _load_initial(self, cfg: ModelConfig) -> None:
        if not self.store.versions(cfg.name):
            if cfg.bundle is None:
                raise ModelNotAvailable(
                    f"model {cfg.name}: the store {self.store.root} holds no version and no bundle is configured"
                )
            with open_bundle(cfg.bundle, workdir=self.store.staging()) as bundle:
                if bundle.manifest.name != cfg.name:
                    raise EdgeAgentError(
                        f"model {cfg.name}: bundle {cfg.bundle} is named {bundle.manifest.name!r}",
                        code="name_mismatch",
                    )
                self.store.install(bundle)
        version = self.store.versions(cfg.name)[-1]
        with self.store.open(cfg.name, version) as bundle:
            model = LoadedModel.load(bundle, cfg)
        with self._lock:
            self._active[cfg.name] = model
        log.info(
            "model %s version %d loaded (%s, %s, input %s)",
            cfg.name,
            version,
            model.manifest.runtime,
            model.manifest.task,
            model.manifest.inputs[0].shape,
        )

    def stop(self) -> None:
        with self._lock:
            while any(m.refs for m in self._active.values()):
                self._lock.wait(timeout=5.0)
            for model in self._active.values():
                model.runtime.close()
            self._active.clear()

    # -- serving -----------------------------------------------------------

    @contextmanager
    def acquire(self, name: str) -> Iterator[LoadedModel]:
        """The active version of ``name`` for the duration of one frame."""
        with self._lock:
            model = self._active.get(name)
            if model is None:
                raise ModelNotAvailable(f"model {name} is not loaded")
            model.refs += 1
        try:
            yield model
        finally:
            with self._lock:
                model.refs -= 1
                self._lock.notify_all()

    def status(self) -> dict[str, Any]:
        """Per model: active version, installed versions, labels, runtime."""
        with self._lock:
            active = dict(self._active)
        out = {}
        for name in self.configs:
            model = active.get(name)
            out[name] = {
                "active": model.version if model else None,
                "versions": self.store.versions(name),
                "labels": {},
                "runtime": model.manifest.runtime if model else None,
            }
        return out
