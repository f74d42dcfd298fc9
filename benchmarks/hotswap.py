"""Hot swap under load: 20 successive swaps between two real models while a
30 fps file source streams, measured from inside the agent's process.

Setup. The real agent (``edge_agent.agent.Agent``) runs in this process with
one source, the demo video (640x480, 30 fps, ``realtime = true``, ``loop =
true``, as a camera would deliver it) and one model, ``mobilenet_v2``:
version 1 is MobileNetV2 int8 (ONNX, QDQ, made by ``edge-agent quantize``
from the fp32 model and cached), version 2 the fp32 MobileNetV2. Version 2 is
installed (not activated) before measuring. Then, every ``--interval``
seconds, ``ModelManager.activate`` switches to the other version (the
activation the ``activate`` command and ``models activate`` run), 20 times,
ending on the int8 version. Probation is on with ``probation_s = 0.5``, so
each version passes it between two swaps; ``max_latency_factor = 20``: fp32
is 2-3x slower than int8 by design here, and on a busy machine more, so the
usual factor of 3 would roll it back and the benchmark would measure
rollbacks instead of swaps.

Each swap mode runs in its own child process (so one does not inherit the
other's memory): ``availability`` (load the new version while the old one
serves) and ``resource`` (unload first, forced with ``swap = "resource"``).

Measured, per mode:

* frames failed (inference errors) and frames dropped (the source's
  newest-frame mailbox overwrote a frame nobody took) from the first swap
  command to 1 s after the last; the target is 0 in availability mode;
* the largest gap between consecutive results within 1 s of a swap command,
  divided by the steady interval (median gap before the first swap);
  target <= 1.5; the same ratio between swaps (from 1 s after a command to
  the next) is the machine's own jitter, for comparison;
* command-to-serving: from the ``activate`` call to the first result from
  the new version (median and max);
* RSS (``psutil``, sampled every 5 ms by a thread): steady = median over
  the 2 s before the first swap, int8 serving; peak = max over the swaps;
  target peak/steady <= 1.6 and steady <= 150 MB with MobileNetV2 int8;
  RSS after the 2nd swap (int8 serving again) vs after the 20th (int8):
  growth beyond noise would be a leak.

Run from the repository root::

    .venv/bin/python benchmarks/hotswap.py            # both modes
    .venv/bin/python benchmarks/hotswap.py --mode availability --swaps 20

JSON goes to stdout, then a readable table; progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _bench import MODEL_NAME, emit, machine_info, pack_mobilenet

import testassets  # noqa: E402  (the checkout is on sys.path through _bench)


def progress(msg: str) -> None:
    print(f"[hotswap] {msg}", file=sys.stderr, flush=True)


def prepare(cache: Path) -> dict[str, Path]:
    """The fp32 and int8 bundles (cached under ``cache/bench-hotswap``) and the video."""
    assets = testassets.build(cache, only={"mobilenet_v2", "imagenet_labels", "photos", "demo_video"})
    work = cache / "bench-hotswap"
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "mobilenet_v2-v2-fp32"
    if not (fp32 / "manifest.json").exists():
        pack_mobilenet(assets, fp32, version=2)
    int8 = work / "int8" / f"{MODEL_NAME}-v1-int8-onnx"
    if not (int8 / "manifest.json").exists():
        progress("quantizing MobileNetV2 to int8 ONNX (once; cached)")
        src = work / "mobilenet_v2-v1-fp32"
        if not (src / "manifest.json").exists():
            pack_mobilenet(assets, src)
        # A separate process: the quantizer imports onnx, which the agent never does.
        subprocess.run(
            [sys.executable, "-m", "edge_agent", "quantize", str(src), "--calibration", str(assets["photos"]),
             "--out", str(work / "int8"), "--target", "onnx", "--no-mixed-precision", "--min-agreement", "0",
             "--version", "1"],
            check=True, stdout=subprocess.DEVNULL,
        )
    return {"fp32": fp32, "int8": int8, "video": assets["demo_video"]}


class RssSampler(threading.Thread):
    def __init__(self, period_s: float = 0.005) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        import psutil

        self.proc = psutil.Process()
        self.period = period_s
        self.samples: list[tuple[float, float]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.period):
            self.samples.append((time.monotonic(), self.proc.memory_info().rss / 2**20))

    def window(self, t0: float, t1: float) -> list[float]:
        return [r for t, r in self.samples if t0 <= t <= t1]


def child(mode: str, swaps: int, interval: float, threads: int, cache: Path) -> dict[str, Any]:
    """One mode, measured in this (fresh) process."""
    paths = prepare(cache)
    from edge_agent.agent import Agent
    from edge_agent.config import parse_config
    from edge_agent.models.lifecycle import deploy
    from edge_agent.testing import RecordingSink

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="hotswap-") as tmp:
        cfg = parse_config({
            "device_id": "bench",
            "log_level": "warning",
            "store": {"path": f"{tmp}/store"},
            "models": [{
                "name": MODEL_NAME, "bundle": str(paths["int8"]), "threads": threads, "swap": mode,
                "probation_s": 0.5, "probation_frames": 1000, "max_latency_factor": 20.0,
            }],
            "sources": [{"name": "cam", "uri": str(paths["video"]), "model": MODEL_NAME, "loop": True,
                         "realtime": True}],
        })
        sink = RecordingSink()
        rss = RssSampler()
        rss.start()
        agent = Agent(cfg, extra_sinks=[sink])
        agent.start()
        try:
            deploy(agent.models, paths["fp32"], activate=False)  # installed, not serving
            time.sleep(4.0)  # warm: int8 serving
            t_first_cmd = time.monotonic()
            steady_rss = statistics.median(rss.window(t_first_cmd - 2.0, t_first_cmd))
            skipped_before = agent.sources[0].stats()["skipped"]
            errors_before = sum(w.stats.errors for w in agent.workers)
            swaps_out = []
            for i in range(swaps):
                target = 2 if i % 2 == 0 else 1
                t_cmd = time.monotonic()
                report = agent.models.activate(MODEL_NAME, target, reason="benchmark")
                if not report.get("changed"):
                    raise SystemExit(f"swap {i}: version {target} was already active (a rollback?)")
                t_done = time.monotonic()
                t_serving = sink.first_after(t_cmd, lambda r: r["version"] == target, timeout=30)
                swaps_out.append({"to": target, "t_cmd": t_cmd, "t_done": t_done, "t_serving": t_serving,
                                  "mode": report["mode"], "load_ms": report["load_ms"], "gap_ms": report.get("gap_ms")})
                time.sleep(max(0.0, interval - (time.monotonic() - t_cmd)))
            t_end = time.monotonic()
            time.sleep(1.0)
            skipped = agent.sources[0].stats()["skipped"] - skipped_before
            errors = sum(w.stats.errors for w in agent.workers) - errors_before
        finally:
            agent.shutdown()
            rss.stop_event.set()
    items = sink.items
    times = [t for _, _, t in items]
    gaps = [(b - a, b) for a, b in zip(times, times[1:])]
    steady_gaps = [g for g, t in gaps if t_first_cmd - 3.0 <= t < t_first_cmd]
    steady_interval = statistics.median(steady_gaps)
    swap_gaps = [g for g, t in gaps if any(s["t_cmd"] <= t <= s["t_cmd"] + 1.0 for s in swaps_out)]
    # the noise floor: the same measure between swaps (from 1 s after a command to the next one)
    quiet_gaps = [g for g, t in gaps if any(s["t_cmd"] + 1.0 < t < s["t_cmd"] + interval for s in swaps_out)]
    c2s = [(s["t_serving"] - s["t_cmd"]) * 1000 for s in swaps_out if s["t_serving"] is not None]
    worst = []  # per swap: its largest gap and when it ended, relative to the command and to the switch
    for s in swaps_out:
        near = [(g, t) for g, t in gaps if s["t_cmd"] <= t <= s["t_cmd"] + 1.0]
        if near:
            g, t = max(near)
            worst.append({"gap_ms": round(g * 1000, 1), "after_cmd_ms": round((t - s["t_cmd"]) * 1000, 1),
                          "after_switch_ms": round((t - s["t_done"]) * 1000, 1)})
    peak_rss = max(rss.window(t_first_cmd, t_end))
    after = [rss.window(s["t_cmd"] + interval - 0.5, s["t_cmd"] + interval) for s in swaps_out]
    rss_after_2 = statistics.median(after[1]) if len(after) > 1 else None
    rss_after_last = statistics.median(after[-1])
    return {
        "mode": mode,
        "swaps": swaps,
        "interval_s": interval,
        "threads": threads,
        "results": len(items),
        "frames_failed": errors,
        "frames_dropped": skipped,
        "steady_interval_ms": round(steady_interval * 1000, 2),
        "max_gap_ms": round(max(swap_gaps) * 1000, 2),
        "max_gap_ratio": round(max(swap_gaps) / steady_interval, 3),
        "max_gap_ratio_between_swaps": round(max(quiet_gaps) / steady_interval, 3) if quiet_gaps else None,
        "command_to_serving_ms": {"median": round(statistics.median(c2s), 1), "max": round(max(c2s), 1)},
        "load_ms": {"median": statistics.median(s["load_ms"] for s in swaps_out),
                    "max": max(s["load_ms"] for s in swaps_out)},
        "resource_gap_ms_max": max((s["gap_ms"] or 0.0) for s in swaps_out),
        "all_served": all(s["t_serving"] is not None for s in swaps_out),
        "worst_gap_per_swap": worst,
        "rss_mb": {
            "steady_int8": round(steady_rss, 1),
            "peak_during_swaps": round(peak_rss, 1),
            "peak_over_steady": round(peak_rss / steady_rss, 3),
            "after_swap_2_int8": round(rss_after_2, 1) if rss_after_2 else None,
            "after_last_swap_int8": round(rss_after_last, 1),
            "growth_mb": round(rss_after_last - rss_after_2, 1) if rss_after_2 else None,
            "after_each_int8_swap": [round(statistics.median(a), 1) for a, s in zip(after, swaps_out)
                                     if s["to"] == 1 and a],
        },
    }


def churn(swaps: int, threads: int, cache: Path) -> dict[str, Any]:
    """No source: ``swaps`` activations back and forth as fast as they go,
    RSS read after each return to int8. Isolates what loading and unloading
    models does to memory over a long life (a leak grows with every swap)."""
    import psutil

    paths = prepare(cache)
    from edge_agent.config import parse_config
    from edge_agent.models.lifecycle import deploy
    from edge_agent.models.manager import ModelManager
    from edge_agent.models.store import ModelStore
    from edge_agent.runtimes import limit_malloc_arenas

    limit_malloc_arenas()  # as the Agent does at start
    proc = psutil.Process()
    with tempfile.TemporaryDirectory(prefix="hotswap-churn-") as tmp:
        cfg = parse_config({"store": {"path": tmp}, "models": [
            {"name": MODEL_NAME, "bundle": str(paths["int8"]), "threads": threads, "swap": "availability"}]})
        manager = ModelManager(ModelStore(Path(tmp)), cfg.models, probation=False)
        manager.start()
        deploy(manager, paths["fp32"], activate=False)
        series = []
        t0 = time.monotonic()
        for i in range(swaps):
            manager.activate(MODEL_NAME, 2 if i % 2 == 0 else 1)
            if i % 2 == 1:
                time.sleep(0.25)  # the retired version is closed in the background 0.1 s after the switch
                series.append(proc.memory_info().rss / 2**20)
        seconds = time.monotonic() - t0
        manager.stop()
    tenth = max(1, len(series) // 10)
    return {
        "mode": "churn", "swaps": swaps, "seconds": round(seconds, 1), "threads": threads,
        "rss_mb": {
            "first_tenth_median": round(statistics.median(series[:tenth]), 1),
            "last_tenth_median": round(statistics.median(series[-tenth:]), 1),
            "min": round(min(series), 1), "max": round(max(series), 1),
        },
    }


def table(runs: list[dict[str, Any]]) -> str:
    churns = [r for r in runs if r["mode"] == "churn"]
    runs = [r for r in runs if r["mode"] != "churn"]
    lines = []
    if runs:
        lines += ["Hot swap: MobileNetV2 int8 <-> fp32 (ONNX), 30 fps video, "
                  f"{runs[0]['swaps']} swaps every {runs[0]['interval_s']} s, {runs[0]['threads']} thread(s)", ""]
    head = f"  {'mode':<13}{'failed':>7}{'dropped':>8}{'gap/steady':>11}{'(between)':>10}{'cmd->serve ms':>15}{'RSS steady':>11}" \
           f"{'peak':>7}{'peak/st':>8}{'after 2':>8}{'after 20':>9}"
    if runs:
        lines.append(head)
    for r in runs:
        m = r["rss_mb"]
        lines.append(
            f"  {r['mode']:<13}{r['frames_failed']:>7}{r['frames_dropped']:>8}{r['max_gap_ratio']:>11.2f}"
            f"{r['max_gap_ratio_between_swaps'] or 0:>10.2f}"
            f"{r['command_to_serving_ms']['median']:>8.0f} /{r['command_to_serving_ms']['max']:>5.0f}"
            f"{m['steady_int8']:>11.1f}{m['peak_during_swaps']:>7.1f}{m['peak_over_steady']:>8.2f}"
            f"{m['after_swap_2_int8'] or 0:>8.1f}{m['after_last_swap_int8']:>9.1f}"
        )
    if runs:
        lines += ["", "  targets: failed and dropped 0, gap/steady <= 1.5, peak/steady <= 1.6, steady <= 150 MB, "
                  "no RSS growth from after-2 to after-20"]
    for c in churns:
        m = c["rss_mb"]
        lines += ["", f"Churn: {c['swaps']} swaps back and forth without traffic in {c['seconds']} s: RSS after a "
                  f"return to int8, first tenth {m['first_tenth_median']} MB, last tenth {m['last_tenth_median']} MB "
                  f"(min {m['min']}, max {m['max']})"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["availability", "resource", "churn", "both", "all"], default="all",
                   help="both: availability and resource; all: both and churn")
    p.add_argument("--churn-swaps", type=int, default=200)
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--interval", type=float, default=1.5, help="seconds between swap commands")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--json-only", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    cache = args.cache or testassets.default_cache_dir()
    if args.child:
        if args.mode == "churn":
            print(json.dumps(churn(args.churn_swaps, args.threads, cache)))
        else:
            print(json.dumps(child(args.mode, args.swaps, args.interval, args.threads, cache)))
        return
    prepare(cache)
    modes = {"both": ["availability", "resource"], "all": ["availability", "resource", "churn"]}.get(
        args.mode, [args.mode])
    runs = []
    for mode in modes:
        progress(f"mode {mode}: {args.swaps} swaps")
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--mode", mode, "--swaps", str(args.swaps), "--interval",
             str(args.interval), "--threads", str(args.threads), "--cache", str(cache),
             "--churn-swaps", str(args.churn_swaps)],
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            sys.exit(f"mode {mode} failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    emit({"benchmark": "hotswap", "machine": machine_info(), "runs": runs}, table(runs), json_only=args.json_only)


if __name__ == "__main__":
    main()
