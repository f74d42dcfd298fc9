"""``edge-agent bench``: latency and throughput of models side by side on
this device (fp32 against int8, ONNX Runtime against LiteRT).

Every model is loaded through the agent's own runtimes (a bundle exactly as
the agent serves it; a bare ``.onnx``/``.tflite`` file with its declared
input), then timed in *rounds*: each round times every model in turn, so a
burst of load from something else on the device lands on all of them and
the ratios stay fair. Per model and round: the median of ``runs`` timed
inferences after ``warmup`` untimed ones. The speed-up of a model is the
median over rounds of (first model's time / this model's time) within the
round; the first model given is the baseline.

Two timings per model: ``infer`` (the runtime call alone, on one
preprocessed input) and, for bundles, ``frame`` (what a camera frame costs:
preprocess a 640x480 frame or the ``--image``, infer, postprocess).
Throughput is single-stream frames per second, 1000 / frame ms. Memory is
the process's resident-memory growth while the model loads (models load
one after the other, so each delta is its own).

Imports nothing the agent does not: no onnx, no TensorFlow.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge_agent.errors import EdgeAgentError

FRAME_SIZE = (640, 480)  # the frame timed when no --image is given: a VGA camera's


class BenchError(EdgeAgentError):
    """Bad input to ``bench`` (exit code 2)."""

    code = "bad_bench_input"
    exit_code = 2


@dataclass
class Candidate:
    """One model to time: its label, how to run one input, how to run a frame."""

    label: str
    path: Path
    runtime: str
    size_bytes: int
    load_ms: float
    rss_mb: float
    infer: Callable[[], Any]
    frame: Callable[[], Any] | None
    close: Callable[[], None]
    infer_ms: list[float] = field(default_factory=list)
    frame_ms: list[float] = field(default_factory=list)


def expand(paths: Sequence[str | Path]) -> list[Path]:
    """Model files, bundle directories and archives; a directory that is not
    a bundle but holds bundles (``edge-agent quantize --out``) stands for
    the bundles in it, in name order."""
    from edge_agent.bundles import is_archive

    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise BenchError(f"{p}: not found")
        if p.is_dir() and not (p / "manifest.json").exists():
            inner = sorted(c for c in p.iterdir() if (c / "manifest.json").exists() or (c.is_file() and is_archive(c)))
            if not inner:
                raise BenchError(f"{p}: a directory that is neither a bundle nor holds bundles")
            out.extend(inner)
        elif p.is_dir() or is_archive(p) or p.suffix.lower() in (".onnx", ".tflite"):
            out.append(p)
        else:
            raise BenchError(f"{p}: expected a .onnx or .tflite file, a bundle directory or a .tar/.tar.gz bundle")
    return out


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def _import_backend(runtime: str) -> None:
    """Import a runtime's library before a model's load is measured, so that
    the first model's load time and memory are its own, not the library's."""
    from edge_agent.runtimes import runtime_class

    runtime_class(runtime)
    if runtime == "tflite":
        from edge_agent.runtimes.litert import interpreter_class

        try:
            interpreter_class()
        except EdgeAgentError:
            pass  # loading the model says so


def _measured(load: Callable[[], Any]) -> tuple[Any, float, float]:
    """``load()``'s result, how long it took (ms) and how much the process's
    resident memory grew (MB)."""
    gc.collect()
    before = _rss_mb()
    t0 = time.perf_counter()
    loaded = load()
    return loaded, (time.perf_counter() - t0) * 1000.0, _rss_mb() - before


def _bundle_candidate(path: Path, threads: int, image: np.ndarray | None, workdir: Path | None) -> Candidate:
    from edge_agent.bundles import open_bundle
    from edge_agent.config import ModelConfig
    from edge_agent.models.servable import LoadedModel

    with open_bundle(path, workdir=workdir) as bundle:
        m = bundle.manifest
        _import_backend(m.runtime)
        model, load_ms, rss_mb = _measured(lambda: LoadedModel.load(bundle, ModelConfig(name=m.name, threads=threads)))
        size = bundle.model_path.stat().st_size
    frame = image if image is not None else _test_frame()
    tensor, _ = model.preprocess(frame)
    quantization = m.metadata.get("quantization")
    precision = quantization.get("precision") if isinstance(quantization, dict) else None
    precision = precision or ("int8" if m.inputs[0].quantization is not None else "fp32")
    return Candidate(
        label=f"{m.name} v{m.version} {m.runtime} {precision}",
        path=path, runtime=m.runtime, size_bytes=size, load_ms=load_ms, rss_mb=rss_mb,
        infer=lambda: model.runtime.infer(tensor),
        frame=lambda: model.process(frame),
        close=model.close,
    )


def _file_candidate(path: Path, threads: int) -> Candidate:
    from edge_agent.runtimes import create_runtime, describe_model, runtime_for_file

    runtime = runtime_for_file(path)
    _import_backend(runtime)
    inputs, outputs = describe_model(path, runtime)
    if len(inputs) != 1:
        raise BenchError(f"{path}: {len(inputs)} inputs; bench times single-input models")
    spec = inputs[0]
    if any(d is None for d in spec.shape[1:]):
        raise BenchError(
            f"{path}: input {spec.name!r} has dynamic dimensions {spec.shape}; pack it into a bundle with "
            "--size WxH (edge-agent pack) and bench the bundle"
        )
    shape = [d if d is not None else 1 for d in spec.shape]
    rt = create_runtime(runtime, path, [spec.model_copy(update={"shape": shape})], outputs, threads=threads)
    _, load_ms, rss_mb = _measured(rt.load)
    # A bare file says nothing about its preprocessing, so there is no picture
    # to feed it: an input of the right shape and type (the timing of these
    # models does not depend on the values).
    rng = np.random.default_rng(0)
    if spec.quantization is not None or np.dtype(spec.dtype).kind == "f":
        tensor = rng.standard_normal(shape).astype(np.float32)
    else:
        info = np.iinfo(np.dtype(spec.dtype))
        tensor = rng.integers(info.min, info.max, shape, endpoint=True).astype(spec.dtype)
    quant = spec.quantization is not None or spec.dtype in ("int8", "uint8")
    return Candidate(
        label=f"{path.name} {runtime}" + (" int8" if quant else ""),
        path=path, runtime=runtime, size_bytes=path.stat().st_size, load_ms=load_ms, rss_mb=rss_mb,
        infer=lambda: rt.infer(tensor), frame=None, close=rt.close,
    )


def _test_frame() -> np.ndarray:
    """A deterministic VGA frame with structure (gradients and edges), so
    preprocessing does real work; the timings do not depend on content."""
    w, h = FRAME_SIZE
    y, x = np.mgrid[0:h, 0:w]
    frame = np.stack([(x * 255 // w), (y * 255 // h), ((x // 40 + y // 40) % 2) * 255], axis=-1)
    return frame.astype(np.uint8)


def load_image(path: str | Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise BenchError(f"{path}: not a picture OpenCV can read")
    return image


def median_ms(fn: Callable[[], Any], warmup: int, runs: int) -> float:
    """The median time of ``runs`` calls of ``fn`` after ``warmup`` untimed ones, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def run(
    paths: Sequence[str | Path],
    *,
    threads: int = 1,
    rounds: int = 5,
    runs: int = 20,
    warmup: int = 3,
    image: np.ndarray | None = None,
    progress: Callable[[str], None] | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Load every model, time them in interleaved rounds, return the report."""
    from edge_agent.runtimes import RUNTIME_SUFFIXES

    say = progress or (lambda _msg: None)
    candidates: list[Candidate] = []
    try:
        for path in expand(paths):
            if path.suffix.lower() in RUNTIME_SUFFIXES:
                cand = _file_candidate(path, threads)
            else:
                cand = _bundle_candidate(path, threads, image, workdir)
            candidates.append(cand)
            say(f"loaded {cand.label} in {cand.load_ms:.0f} ms")
        for r in range(rounds):
            for cand in candidates:
                cand.infer_ms.append(median_ms(cand.infer, warmup, runs))
                if cand.frame is not None:
                    cand.frame_ms.append(median_ms(cand.frame, warmup, runs))
            say(f"round {r + 1}/{rounds}")
    finally:
        for cand in candidates:
            cand.close()
    return _report(candidates, threads=threads, rounds=rounds, runs=runs, warmup=warmup,
                   image="given" if image is not None else f"synthetic {FRAME_SIZE[0]}x{FRAME_SIZE[1]}")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _report(cands: list[Candidate], **settings: Any) -> dict[str, Any]:
    import psutil

    base = cands[0]
    models = []
    for c in cands:
        entry: dict[str, Any] = {
            "model": c.label,
            "path": str(c.path),
            "runtime": c.runtime,
            "size_mb": round(c.size_bytes / 1e6, 3),
            "size_ratio": round(c.size_bytes / base.size_bytes, 3),
            "load_ms": round(c.load_ms, 1),
            "rss_mb": round(c.rss_mb, 1),
            "infer_ms": round(statistics.median(c.infer_ms), 3),
            "infer_speedup": round(statistics.median(b / m for b, m in zip(base.infer_ms, c.infer_ms)), 3),
        }
        if c.frame_ms:
            frame_ms = statistics.median(c.frame_ms)
            entry["frame_ms"] = round(frame_ms, 3)
            entry["fps"] = round(1000.0 / frame_ms, 1)
            if base.frame_ms:
                entry["frame_speedup"] = round(
                    statistics.median(b / m for b, m in zip(base.frame_ms, c.frame_ms)), 3
                )
        models.append(entry)
    return {
        "settings": settings,
        "machine": {"cpu": cpu_name(), "cores": psutil.cpu_count(),
                    "load_avg_1m": round(psutil.getloadavg()[0], 2)},
        "baseline": base.label,
        "models": models,
    }


def table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"{len(report['models'])} model(s), {s['threads']} thread(s), {s['rounds']} interleaved rounds x "
        f"{s['runs']} runs (median), frame: {s['image']}; speed-up against {report['baseline']}",
        f"  {'model':<38} {'MB':>7} {'size x':>7} {'load ms':>8} {'+RSS MB':>8} {'infer ms':>9} {'speed x':>8} "
        f"{'frame ms':>9} {'fps':>7}",
    ]
    for m in report["models"]:
        frame = f"{m['frame_ms']:9.2f} {m['fps']:7.1f}" if "frame_ms" in m else f"{'-':>9} {'-':>7}"
        lines.append(
            f"  {m['model'][:38]:<38} {m['size_mb']:7.2f} {m['size_ratio']:7.3f} {m['load_ms']:8.0f} {m['rss_mb']:8.1f} "
            f"{m['infer_ms']:9.2f} {m['infer_speedup']:8.2f} {frame}"
        )
    machine = report["machine"]
    lines.append(f"  machine: {machine['cpu']}, {machine['cores']} cores, load average {machine['load_avg_1m']}")
    return "\n".join(lines)
