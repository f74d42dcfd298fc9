#!/usr/bin/env python3
"""Micro-batching: 4 sources served by one model, batched against unbatched.

The real :class:`edge_agent.agent.Agent` with ``--sources`` sources (default
4), each on the demo video (``videos/demo.avi``, 300 frames, 640x480) with
``realtime = false`` (every frame handed to inference) and no fps cap, all
served by one MobileNetV2 whose input has a dynamic batch dimension (a copy
of the cached ``models/mobilenet_v2.onnx`` with its declared batch made
``batch``: ``testassets.mobilenet.dynamic_batch_copy``), packed with the
demo's preprocessing. Two variants, run alternately ``--repeats`` times, each
in a fresh store:

``unbatched``
    ``batch_size = 1``: each source's worker runs its own ``session.run``
    (ONNX Runtime runs them concurrently).
``batched``
    ``batch_size = --batch`` (default: the number of sources),
    ``batch_wait_ms = --wait-ms`` (default 5).

Both with the same runtime ``threads`` (``--threads``, default 1). Timed from
the first result of any source to the last: ``fps = (results - 1) / (t_last
- t_first)``, all sources together. Also reported: the batches run and their
mean size, and whether each source's top-1 per frame is the same in both
variants.

Run it from the repository root::

    .venv/bin/python benchmarks/batching.py                 # 4 sources, threads 1, 3 repeats
    .venv/bin/python benchmarks/batching.py --threads 2 --repeats 5 --frames 100

A JSON object on stdout, then a readable table (not with ``--json-only``);
progress on stderr.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import MODEL_NAME, PREPROCESSING, emit, loadavg, machine_info  # noqa: E402

import testassets  # noqa: E402
from testassets.mobilenet import dynamic_batch_copy  # noqa: E402

from edge_agent.agent import Agent  # noqa: E402
from edge_agent.bundles.pack import pack  # noqa: E402
from edge_agent.config import parse_config  # noqa: E402

VARIANTS = ("unbatched", "batched")


def progress(message: str) -> None:
    print(f"[batching] {message}", file=sys.stderr, flush=True)


class Collect:
    """Timestamps every result; stops the agent once every source delivered ``limit``."""

    def __init__(self, sources: int, limit: int | None) -> None:
        self.limit = limit
        self.sources = sources
        self.stop: threading.Event | None = None
        self.lock = threading.Lock()
        self.stamps: list[float] = []
        self.top1: dict[str, dict[int, int]] = {}

    def emit(self, source: str, result: dict[str, Any]) -> None:
        now = time.perf_counter()
        with self.lock:
            mine = self.top1.setdefault(source, {})
            if self.limit is not None and len(mine) >= self.limit:
                return
            self.stamps.append(now)
            mine[result["frame"]] = result["top"][0]["index"] if result.get("top") else -1
            done = self.limit is not None and len(self.top1) == self.sources and all(
                len(v) >= self.limit for v in self.top1.values()
            )
        if done and self.stop is not None:
            self.stop.set()


def run_agent(workdir: Path, bundle: Path, video: Path, *, sources: int, threads: int, batch: int,
              wait_ms: float, frames: int | None) -> dict[str, Any]:
    workdir.mkdir(parents=True)
    config = parse_config({
        "device_id": "bench",
        "log_level": "warning",
        "store": {"path": str(workdir / "store")},
        "models": [{"name": MODEL_NAME, "bundle": str(bundle), "threads": threads, "batch_size": batch,
                    "batch_wait_ms": wait_ms}],
        "sources": [{"name": f"cam{i}", "uri": str(video), "model": MODEL_NAME, "realtime": False, "loop": False}
                    for i in range(sources)],
    }, source="<benchmark>")
    sink = Collect(sources, frames)
    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.WARNING)
    agent = Agent(config, extra_sinks=[sink])
    sink.stop = agent.stop_event
    try:
        agent.start()
        agent.wait(poll_s=0.05)
        errors = sum(w.stats.errors for w in agent.workers)
        batching = agent.batching.stats().get(MODEL_NAME, {"batches": 0, "frames": 0})
    finally:
        agent.shutdown()
        root.setLevel(saved)
    stamps = sorted(sink.stamps)
    if len(stamps) < 2:
        raise RuntimeError("fewer than 2 results")
    return {
        "fps": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "results": len(stamps),
        "errors": errors,
        "batches": batching["batches"],
        "mean_batch": round(batching["frames"] / batching["batches"], 2) if batching["batches"] else 1.0,
        "_top1": sink.top1,
    }


def table(report: dict[str, Any]) -> str:
    p, m, v = report["parameters"], report["machine"], report["variants"]
    lines = [
        f"MobileNetV2 fp32 dynamic batch (ONNX Runtime {m['onnxruntime']}), {p['sources']} sources x "
        f"{p['frames_per_source']} frames of demo.avi, threads {p['threads']}, batch_size {p['batch_size']}, "
        f"batch_wait_ms {p['batch_wait_ms']}, {p['repeats']} repeats, {m['cpu_usable']} CPU(s) {m['cpu_model']}",
        "",
        f"{'variant':<10} {'median fps':>10} {'mean batch':>10}   fps per repeat (all sources together)",
        f"{'-' * 10} {'-' * 10} {'-' * 10}   {'-' * 36}",
    ]
    for name in VARIANTS:
        s = v[name]
        lines.append(f"{name:<10} {s['median_fps']:>10.1f} {s['mean_batch']:>10.2f}   "
                     + ", ".join(f"{f:.1f}" for f in s["fps"]))
    lines.append("")
    lines.append(f"batched/unbatched: ratio of medians {report['ratio']:.3f}, median of per-repeat ratios "
                 f"{report['paired_ratio']:.3f}")
    c = report["checks"]
    lines.append(f"checks: top-1 identical per source and frame: {c['top1_identical']}; errors {c['errors']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--batch", type=int, default=None, help="batch_size of the batched variant (default: --sources)")
    parser.add_argument("--wait-ms", type=float, default=5.0, help="batch_wait_ms (default 5)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=None, help="results per source (default: the whole video)")
    parser.add_argument("--json-only", action="store_true")
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args(argv)
    batch = args.batch or args.sources
    cache = args.cache if args.cache is not None else testassets.default_cache_dir()
    machine = machine_info()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    top1: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edge-agent-batching-") as tmp:
        work = Path(tmp)
        assets = testassets.build(cache, only={"mobilenet_v2", "imagenet_labels", "demo_video"})
        onnx = dynamic_batch_copy(assets["mobilenet_v2"], work / "mobilenet_v2_dynamic.onnx")
        bundle = pack(onnx, name=MODEL_NAME, version=1, out=work / "bundle", preprocessing=dict(PREPROCESSING),
                      labels=assets["imagenet_labels"], task="classify")
        for r in range(args.repeats):
            for name in VARIANTS:
                res = run_agent(work / f"{name}-{r}", bundle, assets["demo_video"], sources=args.sources,
                                threads=args.threads, batch=batch if name == "batched" else 1,
                                wait_ms=args.wait_ms, frames=args.frames)
                top1.setdefault(name, res.pop("_top1"))
                runs[name].append(res)
                progress(f"repeat {r + 1}/{args.repeats} {name:<9} {res['fps']:7.1f} fps, mean batch {res['mean_batch']}")
    variants = {
        name: {
            "fps": [round(x["fps"], 2) for x in items],
            "median_fps": round(statistics.median(x["fps"] for x in items), 2),
            "results": items[0]["results"],
            "mean_batch": round(statistics.fmean(x["mean_batch"] for x in items), 2),
            "errors": sum(x["errors"] for x in items),
        }
        for name, items in runs.items()
    }
    report = {
        "benchmark": "batching",
        "machine": {**machine, "loadavg_at_end": loadavg()},
        "parameters": {"sources": args.sources, "threads": args.threads, "batch_size": batch,
                       "batch_wait_ms": args.wait_ms, "repeats": args.repeats,
                       "frames_per_source": args.frames or "all", "order": "alternating: unbatched, batched"},
        "variants": variants,
        "ratio": round(variants["batched"]["median_fps"] / variants["unbatched"]["median_fps"], 3),
        "paired_ratio": round(statistics.median(
            b / u for b, u in zip(variants["batched"]["fps"], variants["unbatched"]["fps"])), 3),
        "checks": {"top1_identical": top1["batched"] == top1["unbatched"],
                   "errors": variants["batched"]["errors"] + variants["unbatched"]["errors"]},
    }
    emit(report, table(report), json_only=args.json_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
