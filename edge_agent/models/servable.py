"""A servable: one model version loaded in its runtime, ready for frames.

:class:`LoadedModel` holds the runtime, the pre- and postprocessing of the
bundle's manifest, and the version's :class:`ModelStats`; :meth:`LoadedModel.load`
creates and warms it up (timing the latency baseline a probation compares
against) and :meth:`LoadedModel.smoke_test` checks its outputs before it may
serve. It knows nothing of the store or of other versions: the model manager
(:mod:`edge_agent.models.manager`) decides which servables exist, hands them
to frames and closes them.

Thread-safety: :meth:`LoadedModel.process` may be called from any number of
frame threads at once (the runtime serialises where it must; the stats have
their own lock). ``refs`` and ``retired`` belong to the manager and are read
and written only under its condition (see :class:`LoadedModel`).
"""

from __future__ import annotations

import bisect
import collections
import itertools
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge_agent.bundles import Bundle
from edge_agent.config import ModelConfig
from edge_agent.errors import EdgeAgentError
from edge_agent.bundles.manifest import Manifest, concrete_input
from edge_agent.pipeline.postprocess import Postprocessor, make_postprocessor
from edge_agent.pipeline.preprocess import Prepared, Preprocessor
from edge_agent.runtimes import Runtime, create_runtime, release_memory


class SmokeTestFailed(EdgeAgentError):
    code = "smoke_test_failed"


@dataclass
class Inference:
    """What one frame produced: the task part of the result plus timings."""

    payload: dict[str, Any]
    latency_ms: float  # this thread's part: preprocessing (when not done ahead), inference, postprocessing
    infer_ms: float
    pre_ms: float = 0.0  # preprocessing in this thread (about 0 when the capture thread did it)


INFER_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the inference-time histogram ``/metrics`` exposes."""


class ModelStats:
    """Frames, errors and inference times of one loaded version: the recent
    times (probation's median) and a cumulative histogram of all of them
    (Prometheus' ``edge_agent_model_inference_seconds``)."""

    def __init__(self, window: int = 200) -> None:
        self._lock = threading.Lock()
        self.frames = 0
        self.errors = 0
        self.infer_ms: collections.deque[float] = collections.deque(maxlen=window)
        self._bucket_counts = [0] * (len(INFER_BUCKETS_S) + 1)  # the last one: above every bound
        self._infer_s_sum = 0.0

    def ok(self, infer_ms: float, count: int = 1) -> None:
        """``count`` frames (or batch rows) answered, each in ``infer_ms``:
        counted at once, so a request of a million rows is not a million calls."""
        seconds = infer_ms / 1000.0
        slot = bisect.bisect_left(INFER_BUCKETS_S, seconds)
        with self._lock:
            self.frames += count
            self.infer_ms.extend([infer_ms] * min(count, self.infer_ms.maxlen or count))
            self._bucket_counts[slot] += count
            self._infer_s_sum += seconds * count

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def snapshot(self) -> tuple[int, int, list[float]]:
        with self._lock:
            return self.frames, self.errors, list(self.infer_ms)

    def histogram(self) -> tuple[list[tuple[float, int]], float]:
        """The inference times so far: cumulative counts per upper bound
        (``inf`` last, equal to the successful frames) and their sum in seconds."""
        with self._lock:
            counts, total = list(self._bucket_counts), self._infer_s_sum
        return list(zip((*INFER_BUCKETS_S, float("inf")), itertools.accumulate(counts))), total


@dataclass
class LoadedModel:
    """A model version ready to serve: runtime, pre- and postprocessing.

    ``process`` is thread-safe (the runtime serialises where it must).

    Ownership: the model manager that loaded it owns it. A frame holds it
    only between the manager's ``acquire`` and the release at the end of that
    ``with`` block, and never keeps it past the frame. The bookkeeping of
    that is the manager's, not the model's own:

    * ``refs`` (frames holding it now) and ``retired`` (no longer handed out;
      close once ``refs`` is 0) are read and written only while holding the
      manager's condition (``ModelManager._cond``), so the frame that releases
      the last reference of a retired model and the transaction that retires
      an idle one cannot both miss, or both take, the moment to close it;
    * ``closed`` is set by :meth:`close`, which the manager calls once no
      frame holds the model and none can acquire it any more: the release of
      the last frame holding a retired model or the transaction retiring an
      idle one (decided under the condition, so exactly one of the two
      does), a resource-preserving swap once the frames in flight finished,
      or ``stop``. A model that never served (a failed check, a duplicate)
      is closed by whoever loaded it. A closed model must not process again.
    """

    name: str
    version: int
    manifest: Manifest
    runtime: Runtime
    preprocess: Preprocessor | None  # None for a tensor model (task "tensor"): no frame, no result
    postprocess: Postprocessor | None
    refs: int = field(default=0, repr=False)
    stats: ModelStats = field(default_factory=ModelStats, repr=False)
    warm_ms: float = 0.0
    retired: bool = field(default=False, repr=False)
    closed: bool = field(default=False, repr=False)

    @classmethod
    def load(cls, bundle: Bundle, cfg: ModelConfig) -> "LoadedModel":
        """Create the runtime, warm it up and time a few runs (the latency
        baseline probation compares against)."""
        m = bundle.manifest
        # A tensor model runs the inputs a request brings (all of them, any
        # size on a dynamic dimension); a camera model its one frame input.
        inputs = list(m.inputs) if m.preprocessing is None else [concrete_input(m.inputs[0], m.preprocessing)]
        runtime = create_runtime(
            m.runtime, bundle.model_path, inputs, m.outputs, threads=cfg.threads, providers=cfg.providers
        )
        runtime.load()
        try:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                runtime.warm_up()
                times.append((time.perf_counter() - t0) * 1000.0)
            model = cls(
                name=m.name,
                version=m.version,
                manifest=m,
                runtime=runtime,
                preprocess=None if m.preprocessing is None else Preprocessor(m.preprocessing, m.inputs[0]),
                postprocess=None if m.task == "tensor" else make_postprocessor(m, bundle.labels()),
                warm_ms=statistics.median(times),
            )
        except BaseException:
            runtime.close()
            raise
        return model

    def smoke_test(self, root: Path, tolerance: float | None = None) -> None:
        """Outputs finite and of the declared shape for a neutral frame; when the
        bundle carries samples, the same outputs as when it was packed, within
        ``tolerance`` (a fraction of each output's range)."""
        m = self.manifest
        if m.preprocessing is None:
            self._smoke_test_tensors()
            return
        w, h = m.preprocessing.size
        frame = np.full((h, w, 3), 128, np.uint8)
        tensor, _ = self.preprocess(frame)
        self._check_outputs(self.runtime.infer(tensor), "a grey frame")
        if m.samples is None:
            return
        tol = tolerance or m.samples_tolerance
        try:
            with np.load(root / m.samples, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise SmokeTestFailed(f"{self.name} v{self.version}: cannot read samples {m.samples}: {exc}") from None
        inputs = arrays.get("input")
        if inputs is None:
            raise SmokeTestFailed(f"{self.name} v{self.version}: samples {m.samples} hold no 'input' array")
        for i in range(len(inputs)):
            outs = self.runtime.infer(inputs[i : i + 1])
            self._check_outputs(outs, f"sample {i}")
            for k, out in enumerate(outs):
                want = arrays.get(f"output_{k}")
                if want is None:
                    continue
                want = want[i : i + 1]
                if want.shape != out.shape:
                    raise SmokeTestFailed(
                        f"{self.name} v{self.version}: sample {i} output {k} has shape {list(out.shape)}, "
                        f"the bundle recorded {list(want.shape)}"
                    )
                span = float(want.max() - want.min()) or 1.0
                diff = float(np.max(np.abs(out.astype(np.float64) - want)))
                if diff > tol * span:
                    raise SmokeTestFailed(
                        f"{self.name} v{self.version}: sample {i} output {k} differs from the recorded one by "
                        f"{diff:.4g} (allowed {tol:g} of its range {span:.4g})"
                    )

    def _smoke_test_tensors(self) -> None:
        """A tensor model: zeros in every input (dynamic dimensions at 1)
        must give every declared output, each of its declared rank and
        static sizes (their values are the model's business: zeros may
        well be outside what it was made for)."""
        from edge_agent.runtimes.base import warm_up_tensor

        try:
            outs = self.runtime.run({spec.name: warm_up_tensor(spec) for spec in self.manifest.inputs})
        except EdgeAgentError as exc:
            raise SmokeTestFailed(f"{self.name} v{self.version}: cannot run zeros through it: {exc}") from None
        missing = [spec.name for spec in self.manifest.outputs if spec.name not in outs]
        if missing:
            raise SmokeTestFailed(f"{self.name} v{self.version}: no output {missing[0]!r} for zeros")
        self._check_outputs([outs[spec.name] for spec in self.manifest.outputs], "zeros", finite=False)

    def _check_outputs(self, outs: Sequence[np.ndarray], what: str, *, finite: bool = True) -> None:
        specs = self.manifest.outputs
        if len(outs) != len(specs):
            raise SmokeTestFailed(f"{self.name} v{self.version}: {len(outs)} outputs for {what}, declared {len(specs)}")
        for out, spec in zip(outs, specs):
            if len(out.shape) != len(spec.shape) or any(
                d is not None and d != s for d, s in zip(spec.shape, out.shape)
            ):
                raise SmokeTestFailed(
                    f"{self.name} v{self.version}: output {spec.name!r} has shape {list(out.shape)} for {what}, "
                    f"declared {spec.shape}"
                )
            if finite and not np.all(np.isfinite(out)):
                raise SmokeTestFailed(f"{self.name} v{self.version}: output {spec.name!r} is not finite for {what}")

    def process(
        self,
        frame: np.ndarray,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        prepared: Prepared | None = None,
    ) -> Inference:
        """One frame: preprocess, infer, postprocess. ``prepared``: the
        input made ahead (in the capture thread); used when it was made for
        this model's preprocessing (its tag), else the frame is preprocessed
        again here (a hot swap to a model with other preprocessing)."""
        t0 = time.perf_counter()
        try:
            tensor, transform = self.preprocess.tensor_for(frame, prepared)
            t1 = time.perf_counter()
            outputs = self.runtime.infer(tensor)
            t2 = time.perf_counter()
            payload = self.postprocess(outputs, transform, top_k=top_k, threshold=threshold)
        except BaseException:
            self.stats.error()
            raise
        t3 = time.perf_counter()
        self.stats.ok((t2 - t1) * 1000.0)
        return Inference(payload, latency_ms=(t3 - t0) * 1000.0, infer_ms=(t2 - t1) * 1000.0, pre_ms=(t1 - t0) * 1000.0)

    @property
    def batchable(self) -> bool:
        """Several frames can go through the runtime at once: an ONNX model
        whose (4-D) input has a dynamic batch dimension."""
        shape = self.manifest.inputs[0].shape
        return self.manifest.runtime == "onnx" and len(shape) == 4 and shape[0] is None

    def process_batch(
        self, items: Sequence[tuple[np.ndarray, Prepared | None, int | None, float | None]]
    ) -> list[Inference | Exception]:
        """Several frames, ``(image, prepared, top_k, threshold)`` each, as
        one batch: one inference when the model is :attr:`batchable`, else
        one after the other. Returns each frame's result or its error, in
        order. The stats count every frame, with its share of the batch's
        inference time (what probation compares with the one-frame baseline)."""
        if len(items) == 1 or not self.batchable:
            out: list[Inference | Exception] = []
            for image, prepared, top_k, threshold in items:
                try:
                    out.append(self.process(image, top_k=top_k, threshold=threshold, prepared=prepared))
                except Exception as exc:
                    out.append(exc)
            return out
        t0 = time.perf_counter()
        n = len(items)
        try:
            made = [self.preprocess.tensor_for(image, prepared) for image, prepared, _, _ in items]
            batch = np.concatenate([t for t, _ in made], axis=0)
            t1 = time.perf_counter()
            outputs = self.runtime.infer(batch)
            t2 = time.perf_counter()
        except Exception as exc:
            for _ in items:
                self.stats.error()
            return [exc] * n
        share = (t2 - t1) * 1000.0 / n
        results: list[Inference | Exception] = []
        for i, ((_, transform), (_, _, top_k, threshold)) in enumerate(zip(made, items)):
            try:
                payload = self.postprocess([o[i : i + 1] for o in outputs], transform, top_k=top_k, threshold=threshold)
            except Exception as exc:
                self.stats.error()
                results.append(exc)
                continue
            self.stats.ok(share)
            t3 = time.perf_counter()
            results.append(Inference(payload, latency_ms=(t3 - t0) * 1000.0, infer_ms=share, pre_ms=(t1 - t0) * 1000.0 / n))
        return results

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.runtime.close()
            release_memory()


def lower_priority() -> None:
    """nice +10 for the calling thread (Linux threads have their own)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10))
    except (OSError, AttributeError):
        pass


def close_in_background(model: LoadedModel) -> None:
    """Close a retired version off the serving path: freeing a runtime's
    memory and handing it back to the OS takes a few milliseconds of CPU and
    the allocator's lock, which the first frames of the new version must not
    wait for. So it runs at a lower priority, a moment after the switch."""

    def close() -> None:
        lower_priority()
        time.sleep(0.1)
        model.close()

    threading.Thread(target=close, name=f"close-{model.name}-v{model.version}", daemon=True).start()
