"""Measure what quantization did: every artifact against the fp32 model.

Artifacts run through the agent's own runtimes (``edge_agent.runtimes``) and
preprocessing, one thread, exactly as on the device. For each artifact:
top-1 agreement with fp32, the share of samples whose fp32 top-1 is in the
artifact's top-5, accuracy where the evaluation set has labels, file size,
compressed size (what an OTA download costs) and median latency.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge_agent.manifest import Preprocessing
from edge_agent.models.manager import concrete_input
from edge_agent.runtimes import create_runtime, describe_model, runtime_for_file
from quantize.data import Sample, preprocess_all
from quantize.prune import compressed_size


@dataclass
class Artifact:
    """A model file to evaluate, with the preprocessing it expects."""

    label: str  # e.g. "fp32", "int8 onnx"
    path: Path
    preprocessing: Preprocessing
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def runtime(self) -> str:
        return runtime_for_file(self.path)


@dataclass
class Metrics:
    label: str
    runtime: str
    file: str
    size_bytes: int
    compressed_bytes: int
    latency_ms: float
    agreement_top1: float | None = None
    fp32_top1_in_top5: float | None = None
    accuracy: float | None = None
    samples: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Runner:
    """One artifact loaded with the agent's runtime (1 thread by default)."""

    def __init__(self, artifact: Artifact, *, threads: int = 1) -> None:
        self.artifact = artifact
        inputs, outputs = describe_model(artifact.path, artifact.runtime)
        self.input = concrete_input(inputs[0], artifact.preprocessing)
        self.runtime = create_runtime(artifact.runtime, artifact.path, [self.input], outputs, threads=threads)
        self.runtime.load()

    def tensors(self, samples: Sequence[Sample], progress: Callable[[int], None] | None = None) -> np.ndarray:
        return preprocess_all(samples, self.artifact.preprocessing, self.input, progress)

    def outputs(self, tensors: np.ndarray, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """First output per sample, flattened: (N, classes)."""
        rows = []
        for x in tensors:
            rows.append(self.runtime.infer(x[None])[0].reshape(-1))
            if progress:
                progress(1)
        return np.stack(rows)

    def latency_ms(self, tensor: np.ndarray, runs: int = 30) -> float:
        x = tensor[None]
        for _ in range(3):
            self.runtime.infer(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self.runtime.infer(x)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000.0

    def close(self) -> None:
        self.runtime.close()


def agreement(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, share of reference top-1 within candidate top-5)."""
    ref_top1 = reference.argmax(axis=1)
    top1 = float(np.mean(candidate.argmax(axis=1) == ref_top1))
    k = min(5, candidate.shape[1])
    top5 = np.argpartition(-candidate, k - 1, axis=1)[:, :k]
    in5 = float(np.mean([ref_top1[i] in top5[i] for i in range(len(ref_top1))]))
    return top1, in5


def evaluate(
    artifacts: Sequence[Artifact],
    samples: Sequence[Sample],
    *,
    threads: int = 1,
    latency_runs: int = 30,
    progress: Callable[[str, int], Any] | None = None,
) -> list[Metrics]:
    """Evaluate every artifact on ``samples``; the first artifact is the fp32
    reference that agreement is measured against."""
    labels = [s.label for s in samples]
    labelled = all(lbl is not None for lbl in labels)
    reference: np.ndarray | None = None
    results = []
    for art in artifacts:
        runner = Runner(art, threads=threads)
        try:
            tick = (lambda n, lbl=art.label: progress(lbl, n)) if progress else None
            tensors = runner.tensors(samples)
            outs = runner.outputs(tensors, tick)
            latency = runner.latency_ms(tensors[0], latency_runs)
        finally:
            runner.close()
        m = Metrics(
            label=art.label,
            runtime=art.runtime,
            file=art.path.name,
            size_bytes=art.path.stat().st_size,
            compressed_bytes=compressed_size(art.path),
            latency_ms=round(latency, 3),
            samples=len(samples),
            notes=dict(art.notes),
        )
        if reference is None:
            reference = outs
        m.agreement_top1, m.fp32_top1_in_top5 = (round(v, 4) for v in agreement(reference, outs))
        if labelled:
            m.accuracy = round(float(np.mean(outs.argmax(axis=1) == np.asarray(labels))), 4)
        results.append(m)
    return results
