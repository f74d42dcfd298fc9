#!/usr/bin/env python3
"""Throughput of the real agent against a bare ONNX Runtime loop, side by side.

What it measures, in one process, on the same machine, on the demo video
(``videos/demo.avi``: 300 frames, 640x480, 30 fps) and the ImageNet
MobileNetV2 bundle (``models/mobilenet_v2.onnx`` packed with the demo's
preprocessing: crop 0.875, ImageNet mean/std, NCHW RGB):

``agent``
    The real :class:`edge_agent.agent.Agent`, built from a config made in code
    (``edge_agent.config.parse_config``): a model store in a temporary
    directory, the model installed from the bundle, one source on the video
    with ``realtime = false`` (every frame is handed to inference, none is
    skipped), no ``fps`` cap, ``loop = false``, ``log_results`` off (the
    default). Logging at WARNING. A counting sink passed as
    ``extra_sinks`` timestamps every result. The loaded model's
    ``preprocess.prepare`` (run in the capture thread) and ``runtime.infer``
    are wrapped with a timer (two clock reads per call) to split the agent's
    per-frame time into stages.
``agent_info``
    The same with logging at INFO and ``log_results = true``, written with the
    CLI's format to a file in the temporary directory (one line per result, as
    ``edge-agent run`` writes to the journal). Left out with ``--no-info``.
``bare_infer``
    ``onnxruntime.InferenceSession`` with the agent's settings (intra-op
    threads N, inter-op 1, ORT_SEQUENTIAL) running the *same* frames, decoded
    and preprocessed beforehand with :class:`edge_agent.pipeline.preprocess.Preprocessor`
    (built from the bundle's manifest); only ``session.run`` is timed.
``bare_full``
    One thread doing ``cv2.VideoCapture.read`` + ``Preprocessor`` +
    ``session.run`` per frame, serially: what the agent does, without its
    threads, sinks and result messages. Per-stage times are recorded.

Every variant is timed the same way: from its first result to its last, i.e.
``fps = (frames - 1) / (t_last - t_first)``; start-up (bundle install, session
creation, warm-up, opening the video) is outside that window and reported
separately for the agent. Each variant is run ``--repeats`` times, interleaved
(agent, agent_info, bare_infer, bare_full, agent, ...), and the median fps is
reported, with the ratios between medians and the median of the per-repeat
ratios (more robust on a machine shared with other work). Process CPU time
per frame (all threads) is reported too. The agent's top-1 class per frame
is checked against the bare loop's, and its source counters against the frame
count, so the variants demonstrably process the same frames.

Run it from the repository root::

    .venv/bin/python benchmarks/throughput.py                # threads 1, 3 repeats
    .venv/bin/python benchmarks/throughput.py --threads 2 --repeats 5
    .venv/bin/python benchmarks/throughput.py --frames 100 --json-only

The model and the video are taken from the asset cache (``$EDGE_AGENT_CACHE``
or ``~/.cache/edge-agent``, or ``--cache DIR``) and built there by
``testassets`` when missing. A JSON object is printed on stdout
(machine, parameters, per-variant fps lists and medians, ratios, checks), then a
readable table (not with ``--json-only``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import MODEL_NAME, PREPROCESSING, emit, machine_info, pack_mobilenet  # noqa: E402  (puts the checkout on sys.path)

import testassets  # noqa: E402

from edge_agent.agent import Agent  # noqa: E402
from edge_agent.bundles import open_bundle  # noqa: E402
from edge_agent.config import parse_config  # noqa: E402
from edge_agent.pipeline.preprocess import Preprocessor  # noqa: E402

VARIANTS = ("agent", "agent_info", "bare_infer", "bare_full")
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"  # as edge_agent.cli


def progress(message: str) -> None:
    print(f"[throughput] {message}", file=sys.stderr, flush=True)


def fps_between(stamps: list[float]) -> float:
    """Results per second from the first result to the last."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        raise RuntimeError(f"need at least 2 results to time, got {len(stamps)}")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def cpu_ms_per_frame(first: float, last: float, n: int) -> float:
    """Process CPU time (all threads) per result between the first and last result."""
    return (last - first) / (n - 1) * 1e3


# ------------------------------------------------------------------ machine


# ------------------------------------------------------------------ the agent


class CountingSink:
    """Timestamps every result; asks the agent to stop after ``limit`` results."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.stop: threading.Event | None = None  # the agent's stop_event
        self.stamps: list[float] = []
        self.frames: list[int] = []
        self.top1: list[int] = []
        self.latency_ms: list[float] = []
        self.cpu_first = self.cpu_last = 0.0

    def emit(self, source: str, result: dict[str, Any]) -> None:
        now = time.perf_counter()
        if self.limit is not None and len(self.stamps) >= self.limit:
            return
        self.cpu_last = time.process_time()
        if not self.stamps:
            self.cpu_first = self.cpu_last
        self.stamps.append(now)
        self.frames.append(result["frame"])
        self.top1.append(result["top"][0]["index"] if result.get("top") else -1)
        self.latency_ms.append(result["latency_ms"])
        if self.limit is not None and len(self.stamps) >= self.limit and self.stop is not None:
            self.stop.set()


class StageTimer:
    """Wraps a callable and accumulates its wall time (two clock reads a call)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.total = 0.0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total += time.perf_counter() - t0
            self.calls += 1

    def mean_ms(self) -> float | None:
        return self.total / self.calls * 1e3 if self.calls else None


def agent_config(workdir: Path, bundle: Path, video: Path, threads: int, log_results: bool = False) -> Any:
    return parse_config(
        {
            "device_id": "bench",
            "store": {"path": str(workdir / "store")},
            "models": [{"name": MODEL_NAME, "bundle": str(bundle), "threads": threads}],
            "sources": [
                {
                    "name": "bench",
                    "uri": str(video),
                    "model": MODEL_NAME,
                    "realtime": False,  # hand every frame to inference
                    "loop": False,  # no fps key: no rate cap
                    "log_results": log_results,
                }
            ],
        },
        source="<benchmark>",
    )


def run_agent(workdir: Path, bundle: Path, video: Path, threads: int, frames: int | None, info_log: bool) -> dict[str, Any]:
    """One agent run in a fresh store; ``info_log``: logging at INFO to a file."""
    workdir.mkdir(parents=True)
    root = logging.getLogger()
    saved_level = root.level
    handler: logging.Handler | None = None
    if info_log:
        handler = logging.FileHandler(workdir / "agent.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    else:
        root.setLevel(logging.WARNING)
    try:
        config = agent_config(workdir, bundle, video, threads, log_results=info_log)
        sink = CountingSink(frames)
        t0 = time.perf_counter()
        agent = Agent(config, extra_sinks=[sink])
        sink.stop = agent.stop_event
        try:
            agent.start()
            # Time the agent's own preprocess and infer calls (frames already
            # in flight before this point are simply not counted).
            # Preprocessing runs in the capture thread (Preprocessor.prepare,
            # handed to the source by the worker): time that call there.
            with agent.models.acquire(MODEL_NAME) as loaded:
                pre = loaded.preprocess
                pre_timer = pre.prepare = StageTimer(pre.prepare)
                infer_timer = loaded.runtime.infer = StageTimer(loaded.runtime.infer)
            for source in agent.sources:
                source.prepare_with(pre_timer)
            agent.wait(poll_s=0.05)
            source_stats = agent.sources[0].stats() if agent.sources else {}
            worker_errors = agent.workers[0].stats.errors if agent.workers else None
        finally:
            agent.shutdown()
        t_end = time.perf_counter()
    finally:
        root.setLevel(saved_level)
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
    if not sink.stamps:
        raise RuntimeError("the agent produced no result")
    log_lines = None
    if info_log:
        log_lines = sum(1 for _ in open(workdir / "agent.log", encoding="utf-8"))
    return {
        "fps": fps_between(sink.stamps),
        "results": len(sink.stamps),
        "startup_s": sink.stamps[0] - t0,
        "wall_s": t_end - t0,
        "cpu_ms_per_frame": cpu_ms_per_frame(sink.cpu_first, sink.cpu_last, len(sink.stamps)),
        "process_ms_mean": statistics.fmean(sink.latency_ms),
        "preprocess_ms_mean": pre_timer.mean_ms(),
        "infer_ms_mean": infer_timer.mean_ms(),
        "frames_in_order": sink.frames == list(range(len(sink.frames))),
        "source": source_stats,
        "errors": worker_errors,
        "log_lines": log_lines,
        "_top1": sink.top1,
    }


# ------------------------------------------------------------------ bare loops


def make_session(model: Path, threads: int) -> tuple[ort.InferenceSession, str, list[str]]:
    """The agent's session settings (edge_agent.runtimes.onnx)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    session.run(None, {inp.name: np.zeros(shape, dtype=np.float32)})  # warm-up, as Runtime.load does
    return session, inp.name, [o.name for o in session.get_outputs()]


def decode_and_preprocess(video: Path, pre: Preprocessor, frames: int | None) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise RuntimeError(f"cannot open {video}")
    tensors: list[np.ndarray] = []
    try:
        while frames is None or len(tensors) < frames:
            ok, image = cap.read()
            if not ok or image is None:
                break
            tensors.append(pre(image)[0])
    finally:
        cap.release()
    return tensors


def run_bare_infer(model: Path, threads: int, tensors: list[np.ndarray]) -> dict[str, Any]:
    session, name, outputs = make_session(model, threads)
    run = session.run
    stamps: list[float] = []
    results = []
    cpu_first = 0.0
    for x in tensors:
        results.append(run(outputs, {name: x}))
        stamps.append(time.perf_counter())
        if len(stamps) == 1:
            cpu_first = time.process_time()
    cpu_last = time.process_time()
    top1 = [int(np.argmax(r[0])) for r in results]
    return {
        "fps": fps_between(stamps),
        "results": len(stamps),
        "cpu_ms_per_frame": cpu_ms_per_frame(cpu_first, cpu_last, len(stamps)),
        "_top1": top1,
    }


def run_bare_full(model: Path, threads: int, video: Path, pre: Preprocessor, frames: int | None) -> dict[str, Any]:
    session, name, outputs = make_session(model, threads)
    run = session.run
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise RuntimeError(f"cannot open {video}")
    stamps: list[float] = []
    decode = preprocess = infer = cpu_first = 0.0
    clock = time.perf_counter
    try:
        while frames is None or len(stamps) < frames:
            t0 = clock()
            ok, image = cap.read()
            if not ok or image is None:
                break
            t1 = clock()
            x = pre(image)[0]
            t2 = clock()
            run(outputs, {name: x})
            t3 = clock()
            decode += t1 - t0
            preprocess += t2 - t1
            infer += t3 - t2
            stamps.append(t3)
            if len(stamps) == 1:
                cpu_first = time.process_time()
    finally:
        cap.release()
    cpu_last = time.process_time()
    n = len(stamps)
    return {
        "fps": fps_between(stamps),
        "results": n,
        "cpu_ms_per_frame": cpu_ms_per_frame(cpu_first, cpu_last, n),
        "stage_ms": {"decode": decode / n * 1e3, "preprocess": preprocess / n * 1e3, "infer": infer / n * 1e3},
    }


# ------------------------------------------------------------------ driver


def prepare(cache: Path, workdir: Path) -> tuple[Path, Path, Path]:
    """(model, video, bundle): assets from the cache, a fresh bundle in workdir."""
    progress(f"assets from {cache} (built there when missing)")
    assets = testassets.build(cache, only={"mobilenet_v2", "imagenet_labels", "photos", "demo_video"})
    model, video = assets["mobilenet_v2"], assets["demo_video"]
    bundle = pack_mobilenet(assets, workdir / "bundle")
    return model, video, bundle


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant, items in runs.items():
        fps = [round(r["fps"], 2) for r in items]
        entry: dict[str, Any] = {"fps": fps, "median_fps": round(statistics.median(r["fps"] for r in items), 2)}
        entry["median_ms_per_frame"] = round(1000.0 / entry["median_fps"], 2)
        entry["results"] = items[0]["results"]
        entry["median_cpu_ms_per_frame"] = round(statistics.median(r["cpu_ms_per_frame"] for r in items), 2)
        if variant.startswith("agent"):
            entry["startup_s"] = [round(r["startup_s"], 3) for r in items]
            entry["median_process_ms"] = round(statistics.median(r["process_ms_mean"] for r in items), 2)
            entry["median_stage_ms"] = {
                "preprocess": round(statistics.median(r["preprocess_ms_mean"] for r in items), 2),
                "infer": round(statistics.median(r["infer_ms_mean"] for r in items), 2),
            }
            entry["source"] = items[-1]["source"]
            entry["errors"] = items[-1]["errors"]
            entry["frames_in_order"] = all(r["frames_in_order"] for r in items)
            if variant == "agent_info":
                entry["log_lines"] = items[-1]["log_lines"]
        if variant == "bare_full":
            entry["median_stage_ms"] = {
                k: round(statistics.median(r["stage_ms"][k] for r in items), 2) for k in items[0]["stage_ms"]
            }
        out[variant] = entry
    return out


RATIO_PAIRS = [
    ("agent/bare_infer", "agent", "bare_infer"),
    ("agent/bare_full", "agent", "bare_full"),
    ("bare_full/bare_infer", "bare_full", "bare_infer"),
    ("agent_info/agent", "agent_info", "agent"),
    ("agent_info/bare_infer", "agent_info", "bare_infer"),
]


def ratios(summary: dict[str, Any]) -> dict[str, float]:
    """Ratios of the median fps."""
    med = {k: v["median_fps"] for k, v in summary.items()}
    return {name: round(med[a] / med[b], 3) for name, a, b in RATIO_PAIRS if a in med and b in med}


def paired_ratios(summary: dict[str, Any]) -> dict[str, float]:
    """Median over repeats of the ratio within one repeat (variants of one
    repeat run back to back, so a burst of load elsewhere on the machine
    tends to hit both sides of a ratio)."""
    fps = {k: v["fps"] for k, v in summary.items()}
    return {
        name: round(statistics.median(x / y for x, y in zip(fps[a], fps[b])), 3)
        for name, a, b in RATIO_PAIRS
        if a in fps and b in fps
    }


def table(report: dict[str, Any]) -> str:
    summary = report["variants"]
    base = summary["bare_infer"]["median_fps"]
    p = report["parameters"]
    m = report["machine"]
    lines = [
        f"MobileNetV2 fp32 (ONNX Runtime {m['onnxruntime']}), {p['frames']} frames of {Path(p['video']).name}, "
        f"threads {p['threads']}, {p['repeats']} repeats, {m['cpu_usable']} CPU(s) {m['cpu_model']}",
        "",
        f"{'variant':<12} {'median fps':>10} {'ms/frame':>9} {'CPU ms/frame':>12} {'x bare_infer':>13}   fps per repeat",
        f"{'-' * 12} {'-' * 10} {'-' * 9} {'-' * 12} {'-' * 13}   {'-' * 24}",
    ]
    for variant in VARIANTS:
        if variant not in summary:
            continue
        s = summary[variant]
        runs = ", ".join(f"{f:.1f}" for f in s["fps"])
        lines.append(
            f"{variant:<12} {s['median_fps']:>10.1f} {s['median_ms_per_frame']:>9.2f} "
            f"{s['median_cpu_ms_per_frame']:>12.2f} {s['median_fps'] / base:>13.3f}   {runs}"
        )
    lines.append("")
    stages = summary["bare_full"]["median_stage_ms"]
    lines.append(
        "bare_full per frame: "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in stages.items())
        + f" (sum {sum(stages.values()):.2f} ms)"
    )
    a = summary["agent"]
    lines.append(
        f"agent per frame: {a['median_ms_per_frame']:.2f} ms between results; "
        f"inference thread (model.process) {a['median_process_ms']:.2f} ms (infer {a['median_stage_ms']['infer']:.2f}, "
        f"the rest postprocess); capture thread: preprocess {a['median_stage_ms']['preprocess']:.2f}; "
        f"start-up {statistics.median(a['startup_s']):.2f} s (not in fps)"
    )
    lines.append("ratios of medians: " + ", ".join(f"{k} {v:.3f}" for k, v in report["ratios"].items()))
    lines.append(
        "median of per-repeat ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in report["paired_ratios"].items())
    )
    chk = report["checks"]
    lines.append(
        f"checks: agent top-1 = bare top-1 on {chk['top1_agreement']:.1%} of frames; "
        f"skipped frames {chk['agent_skipped']}; errors {chk['agent_errors']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved (default 3)")
    parser.add_argument("--frames", type=int, default=None, help="use only the first N frames (default: all)")
    parser.add_argument("--json-only", action="store_true", help="print the JSON object only, no table")
    parser.add_argument("--no-info", action="store_true", help="leave out the agent_info variant")
    parser.add_argument("--cache", type=Path, default=None, help="asset cache (default: $EDGE_AGENT_CACHE or ~/.cache/edge-agent)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or (args.frames is not None and args.frames < 2):
        parser.error("--threads and --repeats must be >= 1, --frames >= 2")
    variants = [v for v in VARIANTS if not (args.no_info and v == "agent_info")]
    cache = args.cache if args.cache is not None else testassets.default_cache_dir()
    machine = machine_info()

    with tempfile.TemporaryDirectory(prefix="edge-agent-bench-") as tmp:
        workdir = Path(tmp)
        model, video, bundle = prepare(cache, workdir)
        with open_bundle(bundle) as b:
            pre = Preprocessor(b.manifest.preprocessing, b.manifest.inputs[0])
        progress("decoding and preprocessing the frames for bare_infer")
        tensors = decode_and_preprocess(video, pre, args.frames)
        n = len(tensors)
        if n < 2:
            raise SystemExit(f"{video}: fewer than 2 frames")
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        top1: dict[str, list[int]] = {}
        for r in range(args.repeats):
            for variant in variants:
                if variant in ("agent", "agent_info"):
                    res = run_agent(
                        workdir / f"{variant}-{r}", bundle, video, args.threads, args.frames, variant == "agent_info"
                    )
                elif variant == "bare_infer":
                    res = run_bare_infer(model, args.threads, tensors)
                else:
                    res = run_bare_full(model, args.threads, video, pre, args.frames)
                if res["results"] != n:
                    raise RuntimeError(f"{variant}: {res['results']} results, expected {n}")
                if "_top1" in res:
                    top1.setdefault(variant, res.pop("_top1"))
                runs[variant].append(res)
                progress(f"repeat {r + 1}/{args.repeats} {variant:<10} {res['fps']:7.1f} fps")

    try:
        machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        machine["loadavg_at_end"] = None
    summary = summarize(runs)
    agree = sum(a == b for a, b in zip(top1["agent"], top1["bare_infer"])) / n
    report = {
        "benchmark": "throughput",
        "machine": machine,
        "parameters": {
            "threads": args.threads,
            "inter_op_threads": 1,
            "execution_mode": "sequential",
            "repeats": args.repeats,
            "frames": n,
            "order": "interleaved: " + ", ".join(variants),
            "timing": "first result to last result: fps = (frames - 1) / (t_last - t_first)",
            "model": str(model),
            "video": str(video),
            "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in PREPROCESSING.items()},
        },
        "variants": summary,
        "ratios": ratios(summary),
        "paired_ratios": paired_ratios(summary),
        "checks": {
            "top1_agreement": round(agree, 4),
            "agent_skipped": summary["agent"]["source"].get("skipped"),
            "agent_errors": summary["agent"]["errors"],
            "agent_frames_in_order": summary["agent"]["frames_in_order"],
        },
    }
    emit(report, table(report), json_only=args.json_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
