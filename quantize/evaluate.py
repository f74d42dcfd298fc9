"""Measure what quantization did: every artifact against the fp32 model.

Artifacts run through the agent's own runtimes (``edge_agent.runtimes``) and
preprocessing, one thread, exactly as on the device. For each artifact: its
agreement with fp32 as the task's judge measures it (:mod:`quantize.agreement`:
top-1 agreement and fp32's top-1 within the artifact's top-5 for a
classifier; mAP@0.5 against fp32's boxes, recall and precision for a
detector), accuracy where the evaluation set has labels, file size,
compressed size (what an OTA download costs) and median latency.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge_agent.bundles.manifest import Preprocessing
from edge_agent.bundles.manifest import concrete_input
from edge_agent.runtimes import create_runtime, describe_model, runtime_for_file
from quantize.agreement import Judge, TopOne
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
    agreement_top1_stable: float | None = None
    """Agreement on the pictures whose fp32 top-1 survives invisible noise
    (see :func:`noise_floor`)."""
    fp32_top1_in_top5: float | None = None
    accuracy: float | None = None
    samples: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    detection_map50: float | None = None
    """Detectors: mAP@0.5 of the artifact's boxes against fp32's."""
    detection_map50_stable: float | None = None
    """The same on the pictures where fp32's boxes survive invisible noise."""
    detection_recall50: float | None = None
    """Detectors: share of fp32's boxes found again (same label, IoU >= 0.5) at the threshold."""
    detection_precision50: float | None = None
    """Detectors: share of the artifact's boxes at the threshold that fp32 reports too."""
    fp32_boxes: int | None = None
    agreement_metric: str = "top1"

    @property
    def agreement(self) -> float | None:
        """The agreement the quality gate reads: top-1 (classifiers) or mAP@0.5 (detectors)."""
        return self.detection_map50 if self.agreement_metric == "map50" else self.agreement_top1

    @property
    def agreement_stable(self) -> float | None:
        return self.detection_map50_stable if self.agreement_metric == "map50" else self.agreement_top1_stable

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Runner:
    """One artifact loaded with the agent's runtime (1 thread by default)."""

    def __init__(self, artifact: Artifact, *, threads: int = 1) -> None:
        self.artifact = artifact
        inputs, outputs = describe_model(artifact.path, artifact.runtime)
        self.input = concrete_input(inputs[0], artifact.preprocessing)
        self.output_specs = outputs
        self.runtime = create_runtime(artifact.runtime, artifact.path, [self.input], outputs, threads=threads)
        self.runtime.load()

    def tensors(self, samples: Sequence[Sample], progress: Callable[[int], None] | None = None) -> np.ndarray:
        return preprocess_all(samples, self.artifact.preprocessing, self.input, progress)

    def outputs(self, tensors: np.ndarray, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """First output per sample, flattened: (N, classes)."""
        return np.stack([outs[0].reshape(-1) for outs in self.all_outputs(tensors, progress)])

    def all_outputs(self, tensors: np.ndarray, progress: Callable[[int], None] | None = None) -> list[list[np.ndarray]]:
        """Every output per sample (the runtime's arrays, in its output order)."""
        rows = []
        for x in tensors:
            rows.append([np.array(o, copy=True) for o in self.runtime.infer(x[None])])
            if progress:
                progress(1)
        return rows

    def latency_ms(self, tensor: np.ndarray, runs: int = 30) -> float:
        from edge_agent.bench import median_ms

        x = tensor[None]
        return median_ms(lambda: self.runtime.infer(x), warmup=3, runs=runs)

    def close(self) -> None:
        self.runtime.close()


def interleaved_latency(
    artifacts: dict[str, Artifact],
    tensor_of: Callable[[Runner], np.ndarray],
    *,
    rounds: int,
    runs: int,
    threads: int = 1,
    on_round: Callable[[int, dict[str, list[float]]], None] | None = None,
) -> dict[str, list[float]]:
    """Median latency (ms) of every artifact per round: each round times
    every model once (``runs`` runs after a warm-up) on ``tensor_of(runner)``
    (one input, no batch axis), so that the machine's load falls on all of
    them alike. ``on_round(round, times)`` after each round."""
    runners: dict[str, Runner] = {}
    try:
        for key, art in artifacts.items():
            runners[key] = Runner(art, threads=threads)
        tensors = {key: tensor_of(runner) for key, runner in runners.items()}
        times: dict[str, list[float]] = {key: [] for key in runners}
        for r in range(rounds):
            for key, runner in runners.items():
                times[key].append(runner.latency_ms(tensors[key], runs))
            if on_round is not None:
                on_round(r, times)
    finally:
        for runner in runners.values():
            runner.close()
    return times


def latency_cost(full: Artifact, mixed: Artifact, tensor: np.ndarray, *, threads: int = 1, rounds: int = 5,
                 runs: int = 20) -> dict[str, Any]:
    """What mixed precision cost in latency: the median latency of the fully
    int8 model and of the mixed-precision one on ``tensor``, timed in
    alternation (:func:`interleaved_latency`)."""
    times = interleaved_latency({"full": full, "mixed": mixed}, lambda runner: tensor, rounds=rounds, runs=runs,
                                threads=threads)
    a, b = statistics.median(times["full"]), statistics.median(times["mixed"])
    return {"full_int8_ms": round(a, 3), "mixed_ms": round(b, 3), "cost_ms": round(b - a, 3),
            "cost_ratio": round(b / a, 3) if a > 0 else None, "threads": threads}


@dataclass
class NoiseFloor:
    """How stable the fp32 model's own answers are on the evaluation
    pictures: its top-1 (classifiers) or its boxes (detectors)."""

    amp: int
    draws: list[float]  # fp32's agreement with itself, per draw
    stable: np.ndarray  # per picture: top-1 (boxes) unchanged in every draw
    metric: str = "top1"

    @property
    def agreement(self) -> float:
        return float(np.mean(self.draws))

    def to_dict(self) -> dict[str, Any]:
        return {"amp_grey_levels": self.amp, "draws": [round(d, 4) for d in self.draws],
                "agreement": round(self.agreement, 4), "metric": self.metric,
                "stable_samples": int(self.stable.sum()), "samples": int(self.stable.size)}


def noise_floor(runner: Runner, samples: Sequence[Sample], reference: Any, *, amp: int = 1, draws: int = 3,
                seed: int = 0, judge: Judge | None = None) -> NoiseFloor:
    """fp32 against itself: the pictures again with uniform integer noise of
    at most ``amp`` grey levels per pixel (invisible; less than a JPEG
    re-encode changes), ``draws`` times, through the fp32 ``runner``. Where
    many pictures are near ties between two classes, fp32 already disagrees
    with itself on some of them, and no approximation of it (int8 included)
    can be expected to agree more: a gate above this floor measures the
    pictures, not the quantization."""
    judge = judge or TopOne()
    rng = np.random.default_rng(seed)
    per_draw = []
    stable = np.ones(len(samples), dtype=bool)
    for _ in range(draws):
        noisy = [
            replace(s, image=np.clip(s.image.astype(np.int16) + rng.integers(-amp, amp + 1, s.image.shape), 0, 255)
                    .astype(np.uint8))
            for s in samples
        ]
        got = judge.collect(runner, runner.tensors(noisy))
        per_draw.append(judge.agreement(reference, got))
        stable &= judge.same(reference, got)
    return NoiseFloor(amp, per_draw, stable, judge.metric)


def evaluate(
    artifacts: Sequence[Artifact],
    samples: Sequence[Sample],
    *,
    threads: int = 1,
    latency_runs: int = 30,
    noise_draws: int = 3,
    progress: Callable[[str, int], Any] | None = None,
    judge: Judge | None = None,
) -> tuple[list[Metrics], NoiseFloor | None]:
    """Evaluate every artifact on ``samples``; the first artifact is the fp32
    reference that agreement is measured against, as ``judge`` measures it
    (default: top-1). With ``noise_draws`` > 0 and pictures of uint8 pixels,
    also fp32's :func:`noise_floor` on them, and each artifact's agreement
    on the pictures stable under it."""
    judge = judge or TopOne()
    labels = [s.label for s in samples]
    labelled = judge.metric == "top1" and all(lbl is not None for lbl in labels)
    reference: Any = None
    floor: NoiseFloor | None = None
    results = []
    for art in artifacts:
        runner = Runner(art, threads=threads)
        try:
            tick = (lambda n, lbl=art.label: progress(lbl, n)) if progress else None
            tensors = runner.tensors(samples)
            outs = judge.collect(runner, tensors, tick)
            latency = runner.latency_ms(tensors[0], latency_runs)
            if reference is None and noise_draws > 0 and all(s.image.dtype == np.uint8 for s in samples):
                floor = noise_floor(runner, samples, outs, draws=noise_draws, judge=judge)
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
            agreement_metric=judge.metric,
        )
        if reference is None:
            reference = outs
        value = round(judge.agreement(reference, outs), 4)
        details = judge.details(reference, outs)
        stable = None
        if floor is not None and floor.stable.any():
            stable = round(judge.agreement(judge.subset(reference, floor.stable), judge.subset(outs, floor.stable)), 4)
        if judge.metric == "map50":
            m.detection_map50, m.detection_map50_stable = value, stable
            m.detection_recall50 = round(details["recall50"], 4)
            m.detection_precision50 = round(details["precision50"], 4)
            m.fp32_boxes = int(details["fp32_boxes"])
        else:
            m.agreement_top1, m.agreement_top1_stable = value, stable
            m.fp32_top1_in_top5 = round(details["fp32_top1_in_top5"], 4)
        if labelled:
            m.accuracy = round(float(np.mean(outs.argmax(axis=1) == np.asarray(labels))), 4)
        results.append(m)
    return results, floor
