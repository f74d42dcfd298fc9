#!/usr/bin/env python3
"""The agent's CPU per second on a 30 fps 1920x1080 camera with ``fps = 5``:
before and after "decode only what is inferred".

With an fps cap below the camera's rate, 25 of every 30 frames are skipped.
Before, each of them was still converted to a BGR picture (``read()``);
now they are grabbed and passed over (``grab()`` without ``retrieve()``,
and a pipe's JPEG pictures are decoded only when taken). This measures
what that saves, on the real agent.

The stream: ``videos/decode_1080p30.avi`` in the asset cache, built once
from the real photos of the demo video (the same slow zoom and pan, 1920x1080,
MJPEG, 30 fps, 10 s), played in real time and looped, as a camera would
deliver it. Each variant is a separate ``edge-agent run`` process (the
ImageNet MobileNetV2 bundle, ONNX Runtime, 1 thread, results logged at INFO
to a file, no MQTT):

``before``
    the agent at commit ``476b8ba`` (``--before-tree``, a ``git worktree``
    of that commit, made in a temporary directory when not given), reading
    the video file (``cv2.VideoCapture.read()`` per frame).
``after``
    this checkout, the same config: ``grab()`` per frame, ``retrieve()`` only
    for the frames inferred.
``after_pipe``
    this checkout with a pipe source: ``ffmpeg -re -stream_loop -1 -i VIDEO
    -c:v copy -f mjpeg -`` (the JPEG pictures as a camera's MJPEG mode
    delivers them, no re-encoding), decoded only when taken. The agent's CPU
    excludes ffmpeg's, which is reported on its own.

For each run the agent starts, serves its first result, warms up for
``--warmup`` s, then its process CPU time (user + system, all threads, from
psutil) is read over ``--seconds`` s of wall time. Variants are interleaved
(``before, after, after_pipe, before, ...``) ``--repeats`` times; the table
gives the medians. Results served are counted from the log to check that
each variant infers at the capped rate.

    .venv/bin/python benchmarks/decode.py                       # 3 repeats of 20 s
    .venv/bin/python benchmarks/decode.py --repeats 5 --seconds 30 --json-only

A JSON object is printed on stdout, then a readable table (not with
``--json-only``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import REPO, emit, loadavg, machine_info, pack_mobilenet  # noqa: E402  (puts the checkout on sys.path)

import testassets  # noqa: E402
from testassets.common import read_bgr  # noqa: E402
from testassets.demo_video import demo_sequence, ken_burns_frames  # noqa: E402
from testassets.photos import build_photos  # noqa: E402

BEFORE_COMMIT = "476b8ba"
SIZE = (1920, 1080)
CAMERA_FPS = 30
VARIANTS = ("before", "after", "after_pipe")
RESULT_RE = re.compile(r"edge_agent\.results: cam frame \d+:")


def progress(message: str) -> None:
    print(f"[decode] {message}", file=sys.stderr, flush=True)


def build_video(cache: Path) -> Path:
    """The 1080p30 MJPEG stream, from the demo video's real photos (cached)."""
    video = cache / "videos" / "decode_1080p30.avi"
    if video.is_file():
        cap = cv2.VideoCapture(str(video))
        ok = cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == SIZE[0] and cap.get(cv2.CAP_PROP_FRAME_COUNT) >= 300
        cap.release()
        if ok:
            return video
    photos = build_photos(cache)
    sequence = demo_sequence(photos)
    video.parent.mkdir(parents=True, exist_ok=True)
    tmp = video.with_suffix(".tmp.avi")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), CAMERA_FPS, SIZE)
    if not writer.isOpened():
        raise SystemExit("cv2.VideoWriter cannot write an MJPG .avi here")
    progress(f"building {video} ({len(sequence)} photos, 1920x1080, 30 fps)")
    try:
        for variant, name in enumerate(sequence):
            image = read_bgr(photos / f"{name}.jpg")
            for frame in ken_burns_frames(image, CAMERA_FPS, SIZE, variant):
                writer.write(frame)
    finally:
        writer.release()
    tmp.replace(video)
    return video


def before_tree(path: Path | None, keep: list[Path]) -> Path:
    """A checkout of BEFORE_COMMIT: ``path`` if given, else a temporary git worktree."""
    if path is not None:
        return path
    tree = Path(tempfile.mkdtemp(prefix="edge-agent-before-")) / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), BEFORE_COMMIT],
                   check=True, capture_output=True)
    keep.append(tree)
    return tree


def write_config(folder: Path, bundle: Path, source: dict[str, Any]) -> Path:
    lines = [
        'device_id = "decode-bench"',
        "[store]", f'path = "{folder / "store"}"',
        "[[models]]", 'name = "mobilenet_v2"', f'bundle = "{bundle}"', "threads = 1",
        "[[sources]]", 'name = "cam"', 'model = "mobilenet_v2"', "fps = 5",
    ]
    for key, value in source.items():  # JSON strings and lists are TOML too; booleans are spelt the same
        lines.append(f"{key} = {json.dumps(value)}")
    path = folder / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def tree_env(tree: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(tree))  # the tree's edge_agent before the installed one


def imported_from(tree: Path) -> str:
    """Where ``edge_agent`` comes from when run in ``tree`` (proves which code was measured)."""
    out = subprocess.run([sys.executable, "-c", "import edge_agent; print(edge_agent.__file__)"], cwd=tree,
                         env=tree_env(tree), capture_output=True, text=True, check=True)
    return out.stdout.strip()


def run_once(variant: str, tree: Path, config: Path, log: Path, *, warmup: float, seconds: float) -> dict[str, Any]:
    """One agent process: wait for its first result, warm up, measure, stop it."""
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                                cwd=tree, env=tree_env(tree), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    agent = psutil.Process(proc.pid)
    try:
        deadline = time.monotonic() + 120
        while not RESULT_RE.search(log.read_text(errors="replace")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{variant}: the agent served no result; its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        time.sleep(warmup)
        results0 = len(RESULT_RE.findall(log.read_text(errors="replace")))
        children = agent.children(recursive=True)
        t0, cpu0 = time.monotonic(), agent.cpu_times()
        kids0 = [c.cpu_times() for c in children]
        time.sleep(seconds)
        t1, cpu1 = time.monotonic(), agent.cpu_times()
        kids1 = [c.cpu_times() for c in children]
        results = len(RESULT_RE.findall(log.read_text(errors="replace"))) - results0
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    wall = t1 - t0
    agent_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    child_cpu = sum((b.user - a.user) + (b.system - a.system) for a, b in zip(kids0, kids1))
    return {
        "wall_s": round(wall, 3),
        "agent_cpu_s_per_s": round(agent_cpu / wall, 4),
        "children_cpu_s_per_s": round(child_cpu / wall, 4),
        "results_per_s": round(results / wall, 2),
        "exit_code": proc.returncode,
        "edge_agent": imported_from(tree),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved (default 3)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured wall time per run (default 20)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds after the first result before measuring (default 3)")
    parser.add_argument("--before-tree", type=Path, default=None,
                        help=f"a checkout of {BEFORE_COMMIT} (default: a temporary git worktree of it)")
    parser.add_argument("--json-only", action="store_true", help="print the JSON object only, no table")
    parser.add_argument("--cache", type=Path, default=None, help="asset cache (default: $EDGE_AGENT_CACHE or ~/.cache/edge-agent)")
    args = parser.parse_args(argv)
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg is not installed (scripts/setup.sh dev installs it)")

    machine = machine_info()  # its load average is the one at the start
    cache = args.cache or testassets.default_cache_dir()
    assets = testassets.build(cache, only={"mobilenet_v2", "imagenet_labels", "photos"})
    video = build_video(cache)
    made: list[Path] = []
    tree = before_tree(args.before_tree, made)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    try:
        with tempfile.TemporaryDirectory(prefix="edge-agent-decode-") as tmp:
            work = Path(tmp)
            bundle = pack_mobilenet(assets, work / "bundle")
            sources = {
                "before": {"uri": str(video), "loop": True},
                "after": {"uri": str(video), "loop": True},
                "after_pipe": {"command": ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-re",
                                           "-stream_loop", "-1", "-i", str(video), "-c:v", "copy", "-f", "mjpeg", "-"]},
            }
            for repeat in range(args.repeats):
                for variant in VARIANTS:
                    folder = work / f"{variant}-{repeat}"
                    folder.mkdir()
                    config = write_config(folder, bundle, sources[variant])
                    run = run_once(variant, tree if variant == "before" else REPO, config, folder / "agent.log",
                                   warmup=args.warmup, seconds=args.seconds)
                    runs[variant].append(run)
                    progress(f"{variant} #{repeat + 1}: agent {run['agent_cpu_s_per_s']:.3f} CPU-s/s, "
                             f"ffmpeg {run['children_cpu_s_per_s']:.3f}, {run['results_per_s']:.2f} results/s")
    finally:
        for path in made:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True)

    def median(variant: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[variant]), 4)

    medians = {v: {k: median(v, k) for k in ("agent_cpu_s_per_s", "children_cpu_s_per_s", "results_per_s")}
               for v in VARIANTS}
    before = medians["before"]["agent_cpu_s_per_s"]
    report = {
        "benchmark": "decode",
        "machine": machine,
        "loadavg_at_end": loadavg(),
        "stream": {"video": str(video), "size": list(SIZE), "fps": CAMERA_FPS, "codec": "MJPEG", "loop": True},
        "agent_fps_cap": 5,
        "before_commit": BEFORE_COMMIT,
        "params": {"repeats": args.repeats, "seconds": args.seconds, "warmup": args.warmup, "threads": 1},
        "runs": runs,
        "medians": medians,
        "saving": {v: round(1 - medians[v]["agent_cpu_s_per_s"] / before, 3) for v in ("after", "after_pipe")},
    }
    rows = [
        ("before (476b8ba), file, read() every frame", "before"),
        ("after, file, grab() + retrieve() when taken", "after"),
        ("after, pipe (ffmpeg -c:v copy), decode when taken", "after_pipe"),
    ]
    table = [
        f"1920x1080 MJPEG at 30 fps, fps = 5, MobileNetV2 1 thread; medians of {args.repeats} x {args.seconds:.0f} s",
        f"{'variant':<52} {'agent CPU-s/s':>13} {'ffmpeg CPU-s/s':>14} {'results/s':>9}",
    ]
    for label, v in rows:
        m = medians[v]
        ff = f"{m['children_cpu_s_per_s']:.3f}" if v == "after_pipe" else "-"
        table.append(f"{label:<52} {m['agent_cpu_s_per_s']:>13.3f} {ff:>14} {m['results_per_s']:>9.2f}")
    table.append(f"saving against before: file {report['saving']['after']:.0%}, pipe {report['saving']['after_pipe']:.0%} (agent alone)")
    emit(report, "\n".join(table), json_only=args.json_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
